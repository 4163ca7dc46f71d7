"""Which graph gives each member's heatmap: itself, or for an int8 member that failed its check, its fp32 sibling."""

from __future__ import annotations

from typing import Optional

from pneumoedge.bundle import Manifest
from pneumoedge.runtime.members import LoadedMember
from pneumoedge.runtime.sessions import open_model


def map_source_for(member: LoadedMember, manifest: Optional[Manifest], threads: Optional[int]) -> tuple[Optional[LoadedMember], str]:
    """An int8 member whose maps did not correlate with fp32's at export gets its fp32 sibling's maps
    (opened from `manifest` with `threads`); returns the graph to use (None: no maps) and why."""
    if member.heatmap_output is None:
        return None, "no heatmap output"
    if member.precision != "int8":
        return member, f"{member.precision} graph"
    check = (member.card.explain or {}).get("int8_check") or {}
    if check.get("heatmap_from") == "int8":
        return member, f"int8 graph (r >= {check.get('min_correlation', 0):.3f} vs fp32 at export)"
    sibling = None
    if manifest is not None:
        sibling = next((e for e in manifest.members if e.name == member.name and e.precision == "fp32"), None)
    if sibling is None:
        return member, "int8 graph (not checked against fp32)"
    device = "cuda" if member.provider == "CUDAExecutionProvider" else "cpu"
    session = open_model(sibling.path, device, threads)
    fp32 = LoadedMember(sibling.name, sibling.weight, sibling.card, session, str(sibling.path), "fp32")
    why = f"r = {check['min_correlation']:.3f} vs fp32 at export" if "min_correlation" in check else "not checked at export"
    return fp32, f"fp32 graph (int8 maps: {why})"
