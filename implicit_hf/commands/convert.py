"""``implicit-hf convert``: the source path, the output folder, the source's model type and the layer split are
checked before any weight is read (`implicit_hf.modeling.convert.convert_checkpoint` checks the split against the
source's config, and refuses a ``--gguf-file`` it cannot read, naming it, before it reads any weight)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import UsageError
from ..modeling.convert import SUPPORTED_MODEL_TYPES, convert_checkpoint, parse_layers
from . import edge


def run(args: argparse.Namespace) -> None:
    """Convert ``args.source`` into an implicit checkpoint in ``args.output`` and print the layer split."""
    source = edge.check_model_path(args.source, "source", needs_config=args.gguf_file is None)
    edge.check_output_folder(args.output, "output")
    if args.gguf_file is None and (Path(source) / "config.json").is_file():
        model_type = edge.saved_config(source, "source").get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:  # a type transformers does not know fails in AutoConfig
            raise UsageError(
                f"source {source!r} is a {model_type!r} model (config.json model_type); convert takes "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    layers = {}
    for part in ("prelude", "core", "coda"):
        try:
            layers[part] = None if getattr(args, part) is None else parse_layers(getattr(args, part))
        except ValueError as err:
            raise UsageError(f"--{part}: {err}") from err
    try:
        model = convert_checkpoint(
            source,
            args.output,
            layers["prelude"],
            layers["core"],
            layers["coda"],
            gguf_file=args.gguf_file,
            keep_all_layers=args.no_drop,
            injection=args.injection,
            num_loops=args.num_loops,
            core_norm=args.core_norm,
            state_weight=args.state_weight,
            loop_shift=args.loop_shift,
        )
    except ValueError as err:  # the layer split does not fit the source, conflicting loop settings, ...
        raise UsageError(str(err)) from err
    conversion = model.config.conversion
    print(
        f"[convert] {conversion['source']} ({conversion['source_model_type']}, {conversion['source_num_layers']} "
        f"layers) -> {args.output}: prelude {conversion['prelude_layers']}, core {conversion['core_layers']}, "
        f"coda {conversion['coda_layers']}, dropped {conversion['dropped_layers']}"
    )
