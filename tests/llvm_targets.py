"""Compile kernel IR for another CPU than this one (tests that the IR lowers as intended)."""

from __future__ import annotations

import pytest

CALLS = ("bl", "blr", "call", "callq")  # library helpers (fmaf, __extendhfsf2, ...) the kernels must not need


def instructions_for(ir_text: str, triple: str, cpu: str, features: str = "") -> tuple[list[str], str]:
    """(mnemonics, assembly) of ``ir_text`` optimized (-O3) and compiled for ``triple`` / ``cpu``;
    skips the test when this llvmlite has no backend for the triple."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    try:
        target = llvm.Target.from_triple(triple)
    except RuntimeError:
        pytest.skip(f"this llvmlite has no {triple} backend")
    machine = target.create_target_machine(cpu=cpu, features=features, opt=3)
    module = llvm.parse_assembly(ir_text)
    module.triple = triple
    module.verify()
    builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    builder.getModulePassManager().run(module, builder)
    asm = machine.emit_assembly(module)
    lines = [line for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
    return [line.split()[0] for line in lines], asm
