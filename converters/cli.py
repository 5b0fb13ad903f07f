"""The `halfbyte convert` subcommand."""

from __future__ import annotations

import click

from engine.filetypes import OUTPUT_TYPES, QUANTIZE_MIXES

# llama-quantize's mixes written straight from the checkpoint (its per-tensor types, no F16 step).
MIX_FLAGS = [name for name in QUANTIZE_MIXES if name not in OUTPUT_TYPES and name != "bf16"]


def _type_flag(name: str) -> click.Option:
    help_text = "Output type (default)." if name == "q4_0" else f"Output type {name}." if name in OUTPUT_TYPES \
        else f"llama-quantize's {name.upper()} mix."
    return click.option(f"--{name}", "type_name", flag_value=name, default=None, help=help_text)


@click.command()
@click.argument("source")
# A plain string, not click.Path(dir_okay=False): convert() checks the path itself so that a
# directory or a missing parent is our one-line error (exit 1), not click's usage text (exit 2).
@click.option("-o", "--output", type=str, help="Output file (default: <name>-<type>.gguf).")
@click.option("--revision", help="Hub revision (branch, tag or commit) for repo ids and aliases.")
@click.option("--vocab-only", is_flag=True, help="Write the tokenizer and hyper-parameters only, no weights.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--lora", "lora", multiple=True, metavar="ADAPTER",
              help="Merge this PEFT LoRA adapter directory into the weights (repeatable, applied in order).")
@click.option("--lora-scale", "lora_scale", multiple=True, type=float, metavar="S",
              help="Scale of the merged adapters: once for all, or once per --lora (default 1).")
@click.option("--base", metavar="BASE",
              help="SOURCE is a PEFT LoRA adapter: write it as a LoRA adapter GGUF for this base checkpoint.")
@click.option("--gqa", type=int, help="2023 GGML SOURCE: n_head / n_head_kv (default: from the tensors).")
@click.option("--eps", type=float, help="2023 GGML SOURCE: RMS norm epsilon (default 5e-6; LLaMA-2: 1e-5).")
@click.option("-c", "--ctx", "n_ctx", type=int, help="2023 GGML SOURCE: training context (default 2048).")
@click.option("--config", "config_dir", metavar="DIR",
              help="2023 GGML SOURCE: take those from this HF config.json / Meta params.json directory.")
def convert(source: str, output: str | None, revision: str | None, vocab_only: bool, quiet: bool,
            lora: tuple[str, ...], lora_scale: tuple[float, ...], base: str | None, type_name: str | None,
            gqa: int | None, eps: float | None, n_ctx: int | None, config_dir: str | None) -> None:
    """Convert a Hugging Face LLaMA, MPT or Falcon checkpoint to one GGUF file.

    SOURCE is an alias (e.g. llama-7b, mpt-7b, falcon-7b), an org/name repo id,
    or a local checkpoint directory; or a 2023 GGML LLaMA model.bin (ggml, ggmf, ggjt v1-v3),
    written with its own tensor types in today's layouts.
    """
    from converters.convert import convert as run_convert
    from engine.errors import HalfbyteError
    from engine.ggml_legacy import LegacyOptions, convert_ggml, is_legacy_ggml

    if is_legacy_ggml(source):  # a 2023 GGML file (engine/ggml_legacy.py)
        if type_name or lora or lora_scale or base or vocab_only or revision:
            raise HalfbyteError(f"{source}: a 2023 GGML file is converted with its own tensor types and nothing "
                                "else (-o, --gqa, --eps, -c, --config); `halfbyte quantize` the GGUF afterwards")
        options = LegacyOptions(n_ctx=n_ctx, eps=eps, gqa=gqa, config_dir=config_dir)
        click.echo(f"wrote {convert_ggml(source, output, options, progress=not quiet)}", err=True)
        return
    if gqa is not None or eps is not None or n_ctx is not None or config_dir is not None:
        raise HalfbyteError("--gqa, --eps, -c and --config are for 2023 GGML files (model.bin)")

    if len(lora_scale) > 1 and len(lora_scale) != len(lora):
        raise HalfbyteError(f"--lora-scale: give one scale for all adapters or one per --lora "
                            f"({len(lora)}), got {len(lora_scale)}")
    scales = list(lora_scale) if len(lora_scale) > 1 else [lora_scale[0] if lora_scale else 1.0] * len(lora)
    if base is not None:
        if lora:
            raise HalfbyteError("--base (an adapter GGUF) does not go with --lora")
        from converters.convert import convert_adapter

        if type_name in MIX_FLAGS:
            raise HalfbyteError(f"--{type_name}: an adapter GGUF is written as F32 or F16 (--f16)")
        default = "f16" if type_name == "f16" else "f32"
        path = convert_adapter(source, base, output, OUTPUT_TYPES[type_name or default],
                               scale=lora_scale[0] if len(lora_scale) == 1 else 1.0, revision=revision,
                               progress=not quiet)
        click.echo(f"wrote {path}", err=True)
        return
    requested = type_name if type_name in MIX_FLAGS else OUTPUT_TYPES[type_name or "q4_0"]
    path = run_convert(source, output, requested, revision=revision, vocab_only=vocab_only,
                       progress=not quiet, lora=list(zip(lora, scales)))
    click.echo(f"wrote {path}", err=True)


for _name in reversed(list(OUTPUT_TYPES) + MIX_FLAGS):
    convert = _type_flag(_name)(convert)
