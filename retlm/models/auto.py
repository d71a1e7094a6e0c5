"""Loading a trained model: from a run directory, a model directory or a checkpoint, safetensors only,
after checking the files against the checksums recorded when they were saved.

A run directory (written by ``retlm.training``) holds ``model/`` (the final weights) and
``checkpoint-<step>/`` folders; :func:`resolve_model_dir` finds the weights in any of the three.
"""

from __future__ import annotations

import os
from typing import Any

from retlm.models.folders import (  # noqa: F401  (the folder helpers' home; importable here too)
    CHECKPOINT_PREFIX,
    FINAL_DIR,
    checkpoints,
    latest_checkpoint,
    quiet_hf_progress,
    resolve_model_dir,
    verify_model_dir,
)


def load_model(path: str | os.PathLike[str]) -> Any:
    """A trained model from a run dir, model dir or checkpoint, loaded from safetensors only.

    Before anything is parsed, the files are compared with the sha256 recorded when they were saved
    (``retlm_checksums.json``) and the safetensors header is checked against the file's size; a bad
    ``config.json`` is reported with its path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import retlm.models.retnet  # noqa: F401  (register their configs with the Auto classes)
    import retlm.models.retro  # noqa: F401
    import retlm.models.retrofit  # noqa: F401

    model_dir = resolve_model_dir(path)
    verify_model_dir(model_dir, ("config.json", "model.safetensors", "generation_config.json"))
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # invalid json, a wrong type, an unknown model type: name the file
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"{model_dir / 'config.json'} is not a valid RETRO config ({reason})") from None
    try:
        with quiet_hf_progress():  # a "Loading weights" bar per call is noise in `retlm eval`
            return AutoModelForCausalLM.from_pretrained(model_dir, config=config, use_safetensors=True)
    except ValueError:
        raise
    except Exception as err:  # the loaders' messages (safetensors, torch) do not name the file
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"{model_dir / 'model.safetensors'} cannot be loaded ({reason})") from None
