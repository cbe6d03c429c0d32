"""AUTOMATIC1111 sampler names <-> our schedulers (models/diffusion.py). A client may also send our own names."""
from __future__ import annotations

from configs.errors import UserError

# A1111 name: (its aliases, our scheduler). Only names whose sampler we really run; "Euler a" is ancestral.
A1111_SAMPLERS = {
    "Euler": (["k_euler"], "euler"),
    "Euler a": (["k_euler_a"], "euler_a"),
    "DDIM": ([], "ddim"),
    "DPM++ 2M": (["k_dpmpp_2m"], "dpm++"),
    "DDPM": ([], "ddpm"),
}


class SamplerTable:
    """The A1111 samplers a model can run. make_sampler(our_name) builds one, raising UserError when the model
    cannot."""

    def __init__(self, make_sampler, default: str):
        self.available: dict[str, str] = {}
        built = set()
        for name, (_, ours) in A1111_SAMPLERS.items():
            try:
                kind = type(make_sampler(ours))
            except UserError:
                continue
            if kind in built:   # list only samplers that really differ
                continue
            built.add(kind)
            self.available[name] = ours
        self.default = default
        self._lookup = {key.lower(): name for name, (aliases, ours) in A1111_SAMPLERS.items()
                        if name in self.available for key in (name, *aliases, ours)}

    def resolve(self, requested: str | None) -> tuple[str, str]:
        """A client's sampler name (None: the checkpoint's default) -> (A1111 name, our scheduler name)."""
        if requested is None or not requested.strip():
            return self.a1111_name(self.default), self.default
        name = self._lookup.get(requested.strip().lower())
        if name is None:
            raise UserError(f"unknown sampler '{requested}'; this model offers {', '.join(self.available)}")
        return name, self.available[name]

    def a1111_name(self, ours: str) -> str:
        return next((name for name, o in self.available.items() if o == ours.lower()), ours)

    def items(self) -> list[dict]:
        return [{"name": name, "aliases": A1111_SAMPLERS[name][0], "options": {}} for name in self.available]
