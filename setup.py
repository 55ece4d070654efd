"""fedjax_pt: federated pre-training of LLMs in JAX/Flax (Photon / DiLoCo recipe)."""

import setuptools

# Flower's deployment engine (fedjax_pt.deploy): 1.41 is the HTTP engine that code targets.
_DEPLOY = ['flwr>=1.41,<1.42', 'cryptography>=42,<51']

setuptools.setup(
    name='fedjax_pt',
    version='0.1.0',
    description='Federated pre-training of large language models in JAX/Flax',
    license='Apache-2.0',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['fedjax_pt', 'fedjax_pt.*']),
    # The Flower app directory that `flwr run` submits (its components live in this package).
    package_data={'fedjax_pt.deploy': ['app/pyproject.toml']},
    install_requires=[
        'jax>=0.6,<0.11',
        'flax>=0.10.6,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.11,<0.13',
        'grain>=0.2.18,<0.3',
        'ml-collections>=1.0,<2',
        'absl-py>=2.1,<3',
        'numpy>=1.26,<3',
        'tqdm>=4.66,<5',
        'tokenizers>=0.20,<0.24',
        'tensorboardX>=2.6,<3',
        'matplotlib>=3.8,<4',
        'PyYAML>=6,<7',
        'dp-accounting>=0.4,<0.7',
        # The studies' paired t intervals (experiments/*_report.py); dp-accounting needs it too.
        'scipy>=1.10,<2',
        # fedjax_pt.export / init.from_hf: Hugging Face directories (numpy only, no torch).
        'safetensors>=0.4.3,<1',
        'huggingface-hub>=0.23,<3',
        'ml-dtypes>=0.4,<1',
    ],
    extras_require={
        'cuda12': ['jax[cuda12]>=0.6,<0.11'],
        'tfds': ['tensorflow-datasets>=4.9,<5'],
        'sentencepiece': ['sentencepiece>=0.2,<0.3'],
        'deploy': _DEPLOY,
        'test': _DEPLOY + [
            'pytest>=8,<10',
            'pytest-xdist>=3.5,<4',
            'ruff>=0.6,<1',
            'chex>=0.1.88,<0.2',
            'sentencepiece>=0.2,<0.3',
            'tensorflow-datasets>=4.9,<5',
            'nbclient>=0.10,<0.12',
            'nbformat>=5.10,<6',
            'ipykernel>=6.29,<8',
            # The exported models checked in the real library (tests/export_test.py): verified
            # with torch 2.13 (CPU) and transformers 5.25; .ci/run installs the CPU torch first.
            'torch>=2.4',
            'transformers>=5,<6',
        ],
    },
)
