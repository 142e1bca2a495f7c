"""Images in the stages of a Qwen3-VL run (`model.vision` set): the processor and vision token ids, the
image inputs of every batch a stage builds (SFT rows, rollouts, discriminator rows) and of every engine
prompt. A text run has no `StageImages` (None), and every stage then takes the text path unchanged.

Token rows hold *expanded* image pads (one `<|image_pad|>` per LLM token of the image, as the model sees
them); an engine is given the *collapsed* prompt (one pad per image) with the images, and expands it itself
with the same processor settings (the exported preprocessor_config.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from prism_mcore.config import PrismConfig


@dataclass
class StageImages:
    processor: Any  # data.images.ImageProcessor
    tokens: Any     # data.multimodal.VisionTokens

    @staticmethod
    def of(cfg: PrismConfig, tokenizer) -> "StageImages | None":
        """The run's image handling, or None for a text model."""
        if cfg.model.vision is None:
            return None
        from prism_mcore.data.images import ImageProcessor
        from prism_mcore.data.multimodal import VisionTokens

        v = cfg.model.vision
        return StageImages(ImageProcessor.from_vision(v.tower, v.max_pixels), VisionTokens.from_tokenizer(tokenizer))

    def engine_prompt(self, prompt_ids: Sequence[int], images: Sequence[Any]):
        """An engine prompt: the collapsed ids with the (capped) images as vLLM's multi_modal_data."""
        from prism_mcore.data.multimodal import collapse_image_pads
        from prism_mcore.rollout.engine import Prompt

        if not images:
            return Prompt(collapse_image_pads(list(prompt_ids), self.tokens))
        return Prompt(collapse_image_pads(list(prompt_ids), self.tokens),
                      {"image": [self.processor.prepare(im) for im in images]})

    def attach(self, batch, images_per_row: Sequence[Sequence[Any]]):
        """`batch` with each row's images: pixel values, grids, per-row counts, 3-D positions."""
        from prism_mcore.data.multimodal import attach_images

        return attach_images(batch, images_per_row, self.processor, self.tokens)


def attach_images(batch, images: "StageImages | None", images_per_row: Sequence[Sequence[Any]]):
    """`batch` unchanged for a text run; with its rows' images otherwise."""
    return batch if images is None else images.attach(batch, images_per_row)
