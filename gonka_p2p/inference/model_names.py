"""The models the network knows by name, declared once.

Apart from :mod:`gonka_p2p.inference.models` (which builds them, and imports
torch to do so) so that the client library, the node options and the devnet
tool can name the default model without loading an engine.
"""

DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, fp32: what a node serves unless told otherwise
TINY_MODEL = "tiny-llama"  # a small seeded Llama for tests (inference/tiny_model.py)
