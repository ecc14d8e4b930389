"""Memory planning: what one rank needs under each ZeRO stage/offload choice (`ds-train plan`)."""
