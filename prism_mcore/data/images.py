"""Images for Qwen3-VL: decode and check them, then process them exactly as transformers does.

The processing itself is transformers' PIL/numpy processor for this family
(`Qwen2VLImageProcessorPil`: smart resize into [min_pixels, max_pixels] at multiples of patch x merge,
rescale, normalise, cut into patches); it needs no torchvision. We set it to Qwen3-VL's released values
(patch 16, temporal patch 2, merge 2, mean = std = 0.5) and to PRISM's sizes (spec section 2: the long
side capped at 560 px before the processor, max_pixels = 560^2). The one step of our own is that cap,
done with PIL's bicubic resize, the processor's own resampling.

`min_pixels` defaults to one merged patch ((patch x merge)^2 = 1,024 px), not the released 65,536: with the
released value every image smaller than 256 x 256 is upscaled to 64 LLM tokens, which would make the CPU
demo's 64 x 64 images 16 times as long. Images whose sides are already multiples of patch x merge and within
[min_pixels, max_pixels] are not resized at all, so every backend (this one, vLLM's torchvision processor)
sees the same pixels.

A bad image is an `ImageError` with a `reason` the readers count a skipped row under.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # torch is imported where pixels are made: the readers only check images
    import torch

QWEN3_VL_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL's preprocessor_config.json (Qwen2-VL used CLIP's)
QWEN3_VL_STD = (0.5, 0.5, 0.5)
SPEC_MAX_PIXELS = 560 * 560
SPEC_LONG_SIDE = 560
# Refused before decoding: a decompression bomb or a scan far beyond anything max_pixels keeps (PIL itself
# only warns below 89 Mpx).
DEFAULT_MAX_INPUT_PIXELS = 64 * 2**20
MAX_ASPECT = 200  # smart_resize refuses a larger ratio of long to short side

# Reasons a row with a bad image is skipped under (the readers' Counters).
IMAGE_MISSING = "image_missing"              # no file at the path, or neither bytes nor path
IMAGE_URL = "image_url_unsupported"          # training nodes do not download
IMAGE_UNDECODABLE = "image_undecodable"      # PIL cannot read it
IMAGE_TOO_LARGE = "image_too_large"          # more than max_input_pixels
IMAGE_BAD_ASPECT = "image_bad_aspect"        # long side / short side > 200
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # placeholders in the text != images given
IMAGE_REASONS = (IMAGE_MISSING, IMAGE_URL, IMAGE_UNDECODABLE, IMAGE_TOO_LARGE, IMAGE_BAD_ASPECT, IMAGE_COUNT_MISMATCH)


class ImageError(ValueError):
    """One unusable image; `reason` is one of IMAGE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageSource:
    """A checked image, kept encoded (bytes or a path) rather than decoded: a decoded 560 x 560 image is ~1 MB
    and its patches ~4 MB, too much to hold for a whole data set; it is decoded again when its batch is built.
    `width` / `height` are the file's own size."""

    width: int
    height: int
    data: bytes | None = None
    path: str | None = None

    def open(self):
        from PIL import Image

        with Image.open(io.BytesIO(self.data) if self.data is not None else self.path) as image:
            image.load()  # the pixels stay usable after the file is closed
        return image

    def __repr__(self) -> str:  # never print the bytes
        where = f"path={self.path!r}" if self.data is None else f"{len(self.data)} bytes"
        return f"ImageSource({self.width}x{self.height}, {where})"


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor    # [num_patches, 3 * temporal_patch * patch^2] float32, images in order
    image_grid_thw: torch.Tensor  # [num_images, 3] long: (t, h, w) in patches


class ImageProcessor:
    """Checks images (`load`), predicts their token counts from their size alone (`grid`, `num_tokens`), and
    turns them into the model's inputs (`__call__`), through transformers' processor (`.hf`)."""

    def __init__(self, patch_size: int = 16, temporal_patch_size: int = 2, merge_size: int = 2,
                 min_pixels: int | None = None, max_pixels: int = SPEC_MAX_PIXELS,
                 max_long_side: int | None = SPEC_LONG_SIDE, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
                 image_mean: Sequence[float] = QWEN3_VL_MEAN, image_std: Sequence[float] = QWEN3_VL_STD):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.factor = patch_size * merge_size
        self.min_pixels = self.factor ** 2 if min_pixels is None else min_pixels
        # A max below one merged patch cannot be met; smart_resize would still give one, so say so here.
        if max_pixels < self.factor ** 2 or self.min_pixels > max_pixels:
            raise ValueError(f"need (patch*merge)^2 = {self.factor ** 2} <= min_pixels = {self.min_pixels} <= "
                             f"max_pixels = {max_pixels}")
        self.max_pixels = max_pixels
        self.max_long_side = max_long_side
        self.max_input_pixels = max_input_pixels
        self.hf = Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                                           merge_size=merge_size, min_pixels=self.min_pixels, max_pixels=max_pixels,
                                           image_mean=list(image_mean), image_std=list(image_std))
        self.patch_dim = 3 * temporal_patch_size * patch_size ** 2

    @classmethod
    def from_vision(cls, tower: Mapping[str, Any], max_pixels: int = SPEC_MAX_PIXELS, **kwargs) -> "ImageProcessor":
        """From a Qwen3-VL `vision_config` (HF names; `model.vision.tower`) and `model.vision.max_pixels`."""
        return cls(patch_size=int(tower.get("patch_size", 16)),
                   temporal_patch_size=int(tower.get("temporal_patch_size", 2)),
                   merge_size=int(tower.get("spatial_merge_size", 2)), max_pixels=max_pixels, **kwargs)

    # ---- sizes, without pixels -----------------------------------------------------------------
    def capped_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the long-side cap (unchanged when within it)."""
        long = max(width, height)
        if self.max_long_side is None or long <= self.max_long_side:
            return width, height
        scale = self.max_long_side / long
        return max(1, round(width * scale)), max(1, round(height * scale))

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) in patches of an image of this size: transformers' own smart_resize, after the cap."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        w, h = self.capped_size(width, height)
        rh, rw = smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return 1, rh // self.patch_size, rw // self.patch_size

    def num_tokens(self, grid: Sequence[int]) -> int:
        """LLM tokens (<|image_pad|>) of one image: t*h*w / merge^2."""
        t, h, w = (int(x) for x in grid)
        return t * h * w // self.merge_size ** 2

    # ---- checking ------------------------------------------------------------------------------
    def load(self, image: Any, base_dir: str | os.PathLike | None = None) -> ImageSource:
        """Check one image and return it as an `ImageSource`; raises ImageError. `image` is what data files
        hold: encoded bytes, a path (relative ones against `base_dir`), an HF-datasets {bytes, path} dict (bytes
        first, as `datasets` reads it), or a PIL image (kept as PNG bytes)."""
        from PIL import Image

        data, path = None, None
        if isinstance(image, Mapping):
            data, path = image.get("bytes"), image.get("path")
        elif isinstance(image, (bytes, bytearray)):
            data = image
        elif isinstance(image, (str, os.PathLike)):
            path = image
        elif isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        else:
            raise ImageError(IMAGE_MISSING, f"not an image reference ({type(image).__name__})")
        if data is not None:
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise ImageError(IMAGE_UNDECODABLE, "empty or non-binary bytes")
            return self._checked(bytes(data), None)
        if not path or not isinstance(path, (str, os.PathLike)):
            raise ImageError(IMAGE_MISSING, "neither bytes nor a path")
        path = os.fspath(path)
        if "://" in path:
            raise ImageError(IMAGE_URL, path)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise ImageError(IMAGE_MISSING, path)
        return self._checked(None, path)

    def _checked(self, data: bytes | None, path: str | None) -> ImageSource:
        from PIL import Image

        try:
            with warnings.catch_warnings():  # our own limit decides, below PIL's warning level
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data) if data is not None else path) as image:
                    width, height = image.size
                    if width * height > self.max_input_pixels:
                        raise ImageError(IMAGE_TOO_LARGE, f"{width}x{height} > {self.max_input_pixels} pixels")
                    image.load()  # a truncated or corrupt file fails here, not in the middle of a training step
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(IMAGE_TOO_LARGE, str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # what PIL raises for bad files
            raise ImageError(IMAGE_UNDECODABLE, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        w, h = self.capped_size(width, height)
        if max(w, h) / min(w, h) > MAX_ASPECT:
            raise ImageError(IMAGE_BAD_ASPECT, f"{width}x{height}")
        return ImageSource(width, height, data, path)

    # ---- processing ----------------------------------------------------------------------------
    def prepare(self, image: "ImageSource | Any"):
        """The PIL image the processor (ours, or an engine's) is given: decoded, long side capped. Rollout
        engines must be given these, so that they see the pixels the trainer sees."""
        from PIL import Image

        if isinstance(image, ImageSource):
            image = image.open()
        w, h = self.capped_size(*image.size)
        if (w, h) == image.size:
            return image
        # RGB first, as the processor converts before resizing (resizing a palette image would interpolate
        # palette indices).
        return image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)

    def __call__(self, images: Sequence["ImageSource | Any"]) -> ProcessedImages:
        import torch

        if not images:
            return ProcessedImages(torch.zeros(0, self.patch_dim), torch.zeros(0, 3, dtype=torch.long))
        out = self.hf(images=[self.prepare(i) for i in images], return_tensors="np")
        return ProcessedImages(torch.from_numpy(out["pixel_values"]).float(),
                               torch.from_numpy(out["image_grid_thw"]).long())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """preprocessor_config.json for an HF export, so that transformers and vLLM process images the same way
        (the long-side cap is not in it: engines must be given `prepare`d images)."""
        self.hf.save_pretrained(directory)
