"""The checker as an image reward of text-to-image tasks: `geneval` (partial credit) and `geneval:binary`.

The prompts are the task's prompt list (kept, not copied: prompts appended later are scored too); each
must be a caption of the shapes grammar, checked when the reward is made and when a new one is first
scored. Images (B, 3, H, W) in [0, 1] are quantised to uint8 (round(255 x), clamped) as a saved PNG would
be, then checked one by one on the CPU. Not differentiable.
"""

from __future__ import annotations

import numpy as np
import torch

from scoreaction.errors import ScoreactionError
from scoreaction.rewards.images import ImageReward
from scoreaction.shapes.checker import score
from scoreaction.shapes.grammar import Spec, parse


class GenEvalReward(ImageReward):
    """score(image, prompts[cond]).partial, or .binary for `geneval:binary`."""

    def __init__(self, prompts: list[str] | None, spec: str, **options):
        super().__init__(spec, **options)
        name, _, arg = spec.partition(":")
        if arg not in ("", "binary"):
            raise ScoreactionError(f"reward {spec!r}: expected 'geneval' or 'geneval:binary', found {spec!r}")
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ScoreactionError(f"reward {spec!r} needs prompts (captions of the shapes grammar), "
                                   f"found {prompts!r}")
        self.binary, self.prompts, self.specs = arg == "binary", prompts, {}
        for text in prompts:
            self.spec_of(text)

    def spec_of(self, text: str) -> Spec:
        if text not in self.specs:
            try:
                self.specs[text] = parse(text)
            except ScoreactionError as err:
                raise ScoreactionError(f"reward {self.name!r}: {err}") from None
        return self.specs[text]

    def score(self, images, cond):
        if cond is None:
            raise ScoreactionError(f"reward {self.name!r} needs cond (prompt indices), found None")
        bad = sorted({i for i in cond.tolist() if not 0 <= i < len(self.prompts)})
        if bad:
            raise ScoreactionError(f"prompt indices must lie in [0, {len(self.prompts)}), found {bad[:5]}")
        pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        scores = [score(np.asarray(p), self.spec_of(self.prompts[i])) for p, i in zip(pixels.numpy(), cond.tolist())]
        return torch.tensor([s.binary if self.binary else s.partial for s in scores], dtype=torch.float32)
