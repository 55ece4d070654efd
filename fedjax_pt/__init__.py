"""fedjax_pt: federated pre-training of LLMs in JAX/Flax (Photon / DiLoCo recipe)."""

__version__ = '0.1.0'
