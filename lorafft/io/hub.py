"""Inputs named the way the Hugging Face Hub names them, found on disk: repo ids, and the base an adapter names.

A name is read as a Hub id (``org/name`` or ``name``) only when no local file or directory has that name: a local
path always wins. An id is looked up in the local Hub cache first (``snapshot_download(..., local_files_only=True)``)
and downloaded only when it is not cached and the network is allowed, and then only the files a scan reads
(:data:`HUB_FILES`). Where the cache lives (``HF_HOME``, ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE``) and
tokens (``HF_TOKEN``, ``hf auth login``) are huggingface_hub's own settings, read by it; huggingface_hub is an
optional dependency (``pip install 'lorafft[hub]'``), imported only when a name is a Hub id.

A PEFT adapter records its base in ``adapter_config.json`` (``base_model_name_or_path``, and PEFT's ``revision``):
:func:`locate_inputs` takes the base from there when none is given.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from lorafft.errors import InputError
from lorafft.io.adapter_files import ADAPTER_CONFIG, is_adapter
from lorafft.io.jsonfile import CONFIG_BYTES, read_json_object
from lorafft.io.torch_bin import STATE_DICT
from lorafft.options import looks_like_hub_id

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.*")  # a snapshot without any is not a scan's
# what a scan reads from a repository: weights (safetensors or pytorch .bin, sharded or not), configs, adapter files
HUB_FILES = (*WEIGHTS, "*.safetensors.index.json", "pytorch_model*.bin.index.json", "config.json", ADAPTER_CONFIG)
INSTALL_HINT = "to read it as a Hugging Face Hub id, install huggingface_hub: pip install 'lorafft[hub]'"


@dataclass
class Located:
    """The inputs of a scan as local paths (or in-memory state dicts), and how they were found.

    base: the base checkpoint's path (a Hub snapshot folder for a Hub id).
    tuned: the tuned inputs' paths, in the order given.
    record: what the report's ``inputs`` adds to ``base``/``tuned``/``tuned_kind``: ``base_from`` (
        ``"adapter_config.json"`` when the base is the one the adapters name) and ``hub`` (``{"base": {"id",
        "revision"}, "tuned": [{"id", "revision"} or None, ...]}`` for inputs read from the Hub cache; ``revision``
        is the commit). Empty when every input was given as a local path.
    """

    base: object
    tuned: list
    record: dict = field(default_factory=dict)


def locate(source, *, revision: str | None = None) -> tuple[object, dict | None]:
    """``(local path, hub record)`` of one input: a state dict or an existing path as it is (record None), a Hub id
    as its snapshot folder in the Hub cache with ``{"id": source, "revision": commit}``.

    Args:
        source: a path, a ``{name: tensor}`` state dict, or a Hub id (``org/name``, ``name``).
        revision: branch, tag or commit of a Hub id (default: the repository's default branch, ``main``).

    Returns:
        The path to open and the record; a name that is neither an existing path nor a Hub id comes back as it is
        (opening it then says "no such file or directory"). InputError when a Hub id cannot be found.
    """
    if isinstance(source, Mapping):
        return source, None
    name = os.fspath(source)
    if os.path.lexists(name) or not looks_like_hub_id(name):
        return name, None
    try:
        import huggingface_hub  # noqa: F401  (optional: only Hub ids need it)
    except ImportError:
        raise InputError(name, f"no such file or directory ({INSTALL_HINT})") from None
    folder = _snapshot(name, revision)
    return folder, {"id": name, "revision": os.path.basename(os.path.normpath(folder))}


def cached(source: str, *, revision: str | None = None) -> str | None:
    """The local path of ``source`` without downloading anything: an existing path as it is, a Hub id's snapshot
    folder when the local Hub cache holds its weights; None otherwise (also without huggingface_hub)."""
    if os.path.lexists(source):
        return source
    if not looks_like_hub_id(source):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        folder = snapshot_download(source, revision=revision, allow_patterns=list(HUB_FILES), local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError):
        return None
    return folder if _has_weights(folder) else None


def locate_inputs(base, tuned: list, *, revision: str | None = None) -> Located:
    """Every input of a scan located (:func:`locate`); with ``base`` None, the base that the PEFT adapters in
    ``tuned`` name in their ``adapter_config.json`` (all the same one).

    ``revision`` applies to every input found as a Hub id, the base an adapter names included (over the
    ``revision`` its config records). InputError when ``revision`` is given and no input is a Hub id, when an
    input without a base is not an adapter, and when an adapter names no base or another one than the others.
    """
    located = [locate(source, revision=revision) for source in tuned]
    paths, tuned_hub = [path for path, _ in located], [hub for _, hub in located]
    record = {}
    if base is None:
        base, config_revision = _named_base(paths)
        record["base_from"] = ADAPTER_CONFIG
        base_path, base_hub = _base_of_adapter(paths[0], base, revision or config_revision)
    else:
        base_path, base_hub = locate(base, revision=revision)
    if revision is not None and base_hub is None and not any(tuned_hub):
        raise InputError("revision", f"{revision!r} given, but no input is a Hugging Face Hub id (every one is a "
                                     f"local path, and a local path always wins over an id of the same name)")
    hub = {"base": base_hub} if base_hub is not None else {}
    if any(tuned_hub):
        hub["tuned"] = tuned_hub
    if hub:
        record["hub"] = hub
    return Located(base_path, paths, record)


def _snapshot(repo_id: str, revision: str | None) -> str:
    """The snapshot folder of ``repo_id`` at ``revision``: from the cache, else downloaded (:data:`HUB_FILES`)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError, validate_repo_id

    at = "" if revision is None else f" at revision {revision!r}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InputError(repo_id, "no such file or directory") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES), local_files_only=True)
    except LocalEntryNotFoundError:
        folder = None
    if folder is None or not _has_weights(folder):  # not cached, or only its configs (by another program)
        if constants.HF_HUB_OFFLINE:
            raise InputError(repo_id, f"no such file or directory, and its weights are not in the Hugging Face Hub "
                                      f"cache{at} (HF_HUB_OFFLINE is set, so nothing is downloaded)")
        folder = _download(repo_id, revision, at)
    if not _has_weights(folder):
        raise InputError(repo_id, f"no weights lorafft reads ({', '.join(WEIGHTS)}) in its snapshot {folder}{at}")
    return folder


def _download(repo_id: str, revision: str | None, at: str) -> str:
    """``snapshot_download`` of the files a scan reads; huggingface_hub's errors as one-line InputErrors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES))
    except RevisionNotFoundError:
        raise InputError(repo_id, f"no revision {revision!r} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise InputError(repo_id, "no such file or directory, nor a model on the Hugging Face Hub that this "
                                  "machine may read (private and gated models need a token: HF_TOKEN or "
                                  "'hf auth login')") from None
    except OSError as error:  # LocalEntryNotFoundError (no network, not cached), other HTTP errors
        raise InputError(repo_id, f"no such file or directory; as a Hugging Face Hub id it is not cached{at} and "
                                  f"could not be downloaded: {error}") from None


def _has_weights(folder: str) -> bool:
    """True if a cached snapshot holds weights (another program may have cached only a repository's configs)."""
    return any(fnmatch.fnmatch(name, pattern) for name in os.listdir(folder) for pattern in WEIGHTS)


def _named_base(adapters: list) -> tuple[str, str | None]:
    """``(base_model_name_or_path, revision)`` that every adapter directory in ``adapters`` names (the same)."""
    if not adapters:
        raise InputError("base", "no base given, and no adapter to name one")
    named = {}
    for path in adapters:
        if not is_adapter(path):
            raise InputError(STATE_DICT if isinstance(path, Mapping) else path,
                             "not a PEFT adapter directory, so it names no base: give the base first (BASE TUNED)")
        config = os.path.join(path, ADAPTER_CONFIG)
        data = read_json_object(config, max_bytes=CONFIG_BYTES)
        base = data.get("base_model_name_or_path")
        if not isinstance(base, str) or not base.strip():
            raise InputError(config, "names no base model (base_model_name_or_path is empty): give BASE (BASE ADAPTER)")
        revision = data.get("revision") if isinstance(data.get("revision"), str) else None
        named.setdefault((base, revision), config)
    if len(named) > 1:
        bases = ", ".join(f"{config} names {base!r}" + (f" at {rev!r}" if rev else "")
                          for (base, rev), config in named.items())
        raise InputError("tuned", f"the adapters name different bases ({bases}): give BASE")
    ((base, revision),) = named
    return base, revision


def _base_of_adapter(adapter: str, base: str, revision: str | None) -> tuple[object, dict | None]:
    """:func:`locate` for the base an adapter names; a problem names the adapter's config file too."""
    config = os.path.join(adapter, ADAPTER_CONFIG)
    try:
        path, hub = locate(base, revision=revision)
    except InputError as error:
        raise InputError(config, f"base_model_name_or_path {error}") from None
    if hub is None and not os.path.lexists(path):
        raise InputError(config, f"base_model_name_or_path {path}: no such file or directory (give BASE)")
    return path, hub
