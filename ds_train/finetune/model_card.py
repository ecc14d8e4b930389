"""The model card (`README.md`) of an exported fine-tuned model: base model, data, config and
final metrics, with Hugging Face's YAML front matter so hubs and tools index it."""

from __future__ import annotations

from pathlib import Path

import yaml

PIPELINE_TAGS = {"sft": "text-generation", "classification": "text-classification", "masked_lm": "fill-mask"}
TASK_TITLES = {
    "sft": "supervised fine-tuning (instruction/chat)",
    "classification": "sequence classification",
    "masked_lm": "masked-LM continued pretraining",
}


def render_model_card(
    *,
    name: str,
    task: str,
    architecture: str,
    num_params: int,
    base_model: str,
    adapter: dict | None,
    data: dict[str, dict],
    train: dict,
    config_yaml: str,
    final_train: dict,
    final_eval: dict,
    text_pair: bool = False,
) -> str:
    """Markdown text. `data` is {split: dataset meta}, `final_*` the last metrics records;
    `text_pair`: a sentence-pair classifier (its usage encodes two texts)."""
    front = {
        "library_name": "transformers",
        "pipeline_tag": PIPELINE_TAGS[task],
        "tags": ["ds_train", "fine-tuned", task] + (["lora"] if adapter else []),
    }
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    out += [
        f"`{architecture}` fine-tuned with ds_train (`ds-train finetune`, DeepSpeed ZeRO-{train['zero_stage']}) "
        f"for {TASK_TITLES[task]}.",
        "",
        "## Base model",
        "",
        f"- Started from: `{base_model}`",
        f"- Parameters: {num_params:,}",
    ]
    if adapter:
        out.append(
            f"- Fine-tuning: LoRA (r={adapter['r']}, alpha={adapter['alpha']}, dropout={adapter['dropout']}, "
            f"target modules {adapter['target_modules']}), merged into these weights; the adapters alone are "
            "in the run's `adapter/` directory"
        )
    else:
        out.append("- Fine-tuning: full (every parameter trained)")
    out += [
        "",
        "## Data",
        "",
        "| split | files | examples | rows | details |",
        "| --- | --- | --- | --- | --- |",
    ]
    for split, meta in data.items():
        stats = dict(meta["stats"])
        details = ", ".join(f"{k}: {_fmt(v)}" for k, v in stats.items() if k not in ("examples", "rows"))
        files = "<br>".join(f"`{f}`" for f in meta["files"])
        out.append(f"| {split} | {files} | {stats.get('examples', '')} | {meta['rows']} | {details} |")
    if task == "sft":
        chat = next(iter(data.values())).get("chat_template")
        out += ["", f"Chat formatting: the {chat} template (see the tokenizer's `chat_template`)."]
    out += [
        "",
        "## Training",
        "",
        f"{train['steps']} optimizer steps of {train['global_batch_size']} rows on {train['world_size']} "
        f"rank(s), peak learning rate {train['lr']:g} ({train['schedule']}), precision {train['precision']}.",
        "",
        "<details><summary>Resolved run config</summary>",
        "",
        "```yaml",
        config_yaml.strip(),
        "```",
        "",
        "</details>",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in ("loss",):
        if key in final_train:
            out.append(f"| train {key} (last logged step {final_train['step']}) | {final_train[key]:.4f} |")
    for key, value in final_eval.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out.append(f"| {key} | {_fmt(value)} |")
    if "valid_per_class" in final_eval:
        out += ["", "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        for cls, m in final_eval["valid_per_class"].items():
            out.append(
                f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
            )
    if "valid_confusion" in final_eval:
        labels = final_eval["valid_confusion"]["labels"]
        out += ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
        out.append("| | " + " | ".join(labels) + " |")
        out.append("| --- " * (len(labels) + 1) + "|")
        for label, row in zip(labels, final_eval["valid_confusion"]["matrix"]):
            out.append(f"| **{label}** | " + " | ".join(str(v) for v in row) + " |")
    out += ["", "## Usage", "", "```python", *_usage(task, text_pair), "```", ""]
    return "\n".join(out)


def write_model_card(out_dir: str | Path, text: str) -> Path:
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path


def _usage(task: str, text_pair: bool = False) -> list[str]:
    cls = {"sft": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}.get(
        task, "AutoModelForMaskedLM"
    )
    lines = [
        f"from transformers import AutoTokenizer, {cls}",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        f'model = {cls}.from_pretrained("path/to/this/directory")',
    ]
    if task == "classification":
        lines += [
            # a pair model was trained on both segments (token_type_ids): one text alone is another input
            'logits = model(**tokenizer("first text", "second text", return_tensors="pt")).logits'
            if text_pair
            else 'logits = model(**tokenizer("some text", return_tensors="pt")).logits',
            "print(model.config.id2label[int(logits.argmax())])",
        ]
    elif task == "sft":
        lines += [
            'messages = [{"role": "user", "content": "..."}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        ]
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
