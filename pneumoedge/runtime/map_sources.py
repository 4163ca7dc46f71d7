"""Which graph gives each member's heatmap: itself, or for an int8 member that failed its check, its fp32 sibling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pneumoedge.runtime.members import LoadedMember

if TYPE_CHECKING:
    from pneumoedge.runtime.ensemble import Ensemble


def map_source_for(ensemble: Ensemble, member: LoadedMember) -> tuple[Optional[LoadedMember], str]:
    """An int8 member whose maps did not correlate with fp32's at export gets its fp32 sibling's maps."""
    if member.heatmap_output is None:
        return None, "no heatmap output"
    if member.precision != "int8":
        return member, f"{member.precision} graph"
    check = (member.card.explain or {}).get("int8_check") or {}
    if check.get("heatmap_from") == "int8":
        return member, f"int8 graph (r >= {check.get('min_correlation', 0):.3f} vs fp32 at export)"
    sibling = None
    if ensemble.manifest is not None:
        sibling = next((e for e in ensemble.manifest.members if e.name == member.name and e.precision == "fp32"), None)
    if sibling is None:
        return member, "int8 graph (not checked against fp32)"
    device = "cuda" if member.provider == "CUDAExecutionProvider" else "cpu"
    from pneumoedge.runtime.loading import open_session

    session = open_session(sibling.path, device, ensemble.threads)
    fp32 = LoadedMember(sibling.name, sibling.weight, sibling.card, session, str(sibling.path), "fp32")
    why = f"r = {check['min_correlation']:.3f} vs fp32 at export" if "min_correlation" in check else "not checked at export"
    return fp32, f"fp32 graph (int8 maps: {why})"
