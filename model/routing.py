"""Hands each forward's video spans to the decoder layers, without touching the vision tower.

The spans come from ``input_ids`` and the grids, which only ``Qwen2_5_VLModel.forward`` sees;
the layers see embeddings. Two forward pre-hooks bridge that: one on ``Qwen2_5_VLModel`` builds
the :class:`SpanPlan`, one on the text model passes it on as the ``nsa_spans`` keyword, which the
decoder layers forward to ``self_attn``. (Giving it to the top-level forward instead would also
send it into the vision tower.) A keyword, not model state: gradient checkpointing recomputes a
layer with the keywords of its first call, so the recomputation uses the same spans.

Decoding steps (the KV cache already holds tokens) get no plan: generated text is dense over
the cache.
"""

from __future__ import annotations

from flexnsa import NSAConfig

from .compat import cache_of
from .spans import SparseModality, SpanPlan, find_spans, tokens_per_item


class SpanRouter:
    """Builds the :class:`SpanPlan` of each prefill; ``enabled=False`` makes the model upstream's."""

    def __init__(self, vl_model, nsa_config: NSAConfig, images_as_video: bool = False):
        self.config = vl_model.config
        self.nsa_config = nsa_config
        self.images_as_video = images_as_video
        self.enabled = True
        self._pending: SpanPlan | None = None
        self._handles = [
            vl_model.register_forward_pre_hook(self._before_vl_model, with_kwargs=True),
            vl_model.language_model.register_forward_pre_hook(self._before_text_model, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def plan(self, input_ids, attention_mask=None, video_grid_thw=None, image_grid_thw=None) -> SpanPlan:
        """Video (and, by option, image) spans of ``input_ids``, checked against the grids."""
        merge = self.config.vision_config.spatial_merge_size
        modalities = [SparseModality("video", self.config.video_token_id, tokens_per_item(video_grid_thw, merge))]
        if self.images_as_video:
            modalities.append(
                SparseModality("image", self.config.image_token_id, tokens_per_item(image_grid_thw, merge))
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None  # a prepared 4-D mask: padding is never a video token anyway
        return find_spans(input_ids, modalities, attention_mask, min_length=self.nsa_config.block_size)

    def _before_vl_model(self, module, args, kwargs):
        self._pending = None
        if not self.enabled:
            return None
        kwargs = dict(kwargs, **dict(zip(("input_ids", "attention_mask", "position_ids", "cache"), args)))
        input_ids, cache = kwargs.get("input_ids"), cache_of(kwargs)
        new_vision = kwargs.get("pixel_values_videos") is not None or (
            self.images_as_video and kwargs.get("pixel_values") is not None
        )
        if cache is not None and cache.get_seq_length() > 0:
            if new_vision:
                raise NotImplementedError(
                    "NSA prefill of new video after cached tokens (chunked prefill, multi-turn) is not supported"
                )
            return None  # decoding: dense over the cache
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError("the NSA model needs input_ids to find the video tokens (got only inputs_embeds)")
            return None
        plan = self.plan(
            input_ids, kwargs.get("attention_mask"), kwargs.get("video_grid_thw"), kwargs.get("image_grid_thw")
        )
        if plan.any and kwargs.get("position_ids") is None and kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                "video tokens without mm_token_type_ids (or position_ids): transformers would silently "
                "give them 1-D positions instead of 3D mRoPE; pass "
                "mm_token_type_ids=model.spans.mm_token_type_ids(input_ids, image_token_id, video_token_id)"
            )
        self._pending = plan
        return None

    def _before_text_model(self, module, args, kwargs):
        plan, self._pending = self._pending, None
        if plan is None and self.enabled and kwargs.get("input_ids") is not None:
            cache = cache_of(kwargs)
            if cache is None or cache.get_seq_length() == 0:  # the text model called on its own
                plan = self.plan(kwargs["input_ids"], kwargs.get("attention_mask"))
        if plan is None:
            return None
        return args, dict(kwargs, nsa_spans=plan)
