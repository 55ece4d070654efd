"""Federated text data: sources, tokenizers, partitioning, packing and grain pipelines.

    cfg = DataConfig.from_config(config.data)
    data = build_federated_data(cfg, num_clients=8, seed=0)
    batch = next(data.client_iterator(3))  # [batch_size, seq_len + 1] int32
"""

from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.pipeline import FederatedData, build_federated_data
from fedjax_pt.data.tokenizers import Tokenizer, load_tokenizer, padded_vocab_size

__all__ = [
    'DataConfig',
    'FederatedData',
    'Tokenizer',
    'build_federated_data',
    'load_tokenizer',
    'padded_vocab_size',
]
