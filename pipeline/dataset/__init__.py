"""The dataset contract: what data_prep writes and the pipeline reads, and nothing else.

* ``prep_config``: the dataset build config (``configs/data/*.yaml``);
* ``manifest``: ``manifest.json`` (splits, shards with size and sha256, tokenizer hash, kind);
* ``tokenizer``: loading a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json`` (an
  import-hf export's ``hf_tokenizer/``) with its special ids checked (``hf_tokenizer`` renders chat
  templates);
* ``tasks``: the task-file format (JSON lines of ``TaskExample``) and each task's scorer;
* ``seeding``: the one seed derivation every seeded stream uses.

data_prep imports this package only (tests/unit/test_structure.py). The typed-config loader that
reads dataset configs, and the atomic file writer every build step uses, are re-exported here
as part of the contract.
"""

from pipeline.atomic_io import atomic_path, atomic_write_bytes, atomic_write_text
from pipeline.config import ConfigError, load_config, read_yaml, to_dict

__all__ = [
    "ConfigError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_config",
    "read_yaml",
    "to_dict",
]
