"""The vision-language objective: weighted LM + contrastive (InfoNCE) + image-text matching.

`VLMLoss(model, *prepare(batch)) -> (loss_sum, n, sums to report)` plugs into `train.fit` like any
other loss. With `n` = rows in the micro-batch, `loss_sum / n` is

  lm_weight * LM + contrastive_weight * InfoNCE + itm_weight * ITM

- LM: mean token cross-entropy over the masked tokens (text rows: the text; chat rows: the
  assistant turns), image tokens never scored.
- InfoNCE: symmetric cross-entropy over the batch's image x caption cosine similarities times
  the inverse temperature (learnable `logit_scale`, clipped at 100, or fixed 1 / `temperature`);
  only rows with an image and a caption take part. Rows whose captions are the same text are
  each other's positives (the target spreads over them), not false negatives.
- ITM: a 2-way head on the decoder run over [image tokens; caption]. Each image is paired with
  its caption (label 1), with its hardest in-batch negative caption (the most similar other
  caption with a different text) and each caption with its hardest negative image (label 0). The negatives are chosen
  from the similarity matrix under `stop_gradient`; the two negatives weigh half each, so the
  classes are balanced. The head reads the mean decoder state over the caption's tokens (each
  has attended to the whole image).

Every component with a non-zero weight is reported per step (`lm_loss`, `contrastive_loss`,
`itm_loss`, `itm_accuracy`; and `temperature`), each a row mean like the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlxcore.train.losses import token_cross_entropy

KEYS = ("inputs", "targets", "mask", "pixels", "image_valid", "captions", "caption_mask", "pair_valid")


@dataclass(frozen=True)
class VLMLoss:
    lm_weight: float = 1.0
    contrastive_weight: float = 1.0
    itm_weight: float = 1.0
    temperature: float = 0.07
    learn_temperature: bool = True

    def tokens(self, batch) -> int:
        return batch["inputs"].size

    def prepare(self, batch) -> tuple[np.ndarray, ...]:
        return tuple(batch[k] for k in KEYS)

    def scale(self, model) -> mx.array:
        if self.learn_temperature:
            return mx.minimum(mx.exp(model.logit_scale[0]), 100.0)
        return mx.array(1.0 / self.temperature)

    def __call__(self, model, inputs, targets, mask, pixels, image_valid, captions, caption_mask, pair_valid):
        n = mx.array(float(inputs.shape[0]))
        zero = mx.array(0.0)
        lm = zero
        if self.lm_weight:
            ce = token_cross_entropy(model(inputs, pixels), targets) * mask
            lm = ce.sum() / mx.maximum(mask.sum(), 1.0)
        con = itm = acc = zero
        if self.contrastive_weight or self.itm_weight:  # (a model without the heads trains on the LM loss alone)
            scale = self.scale(model)
            first = pixels[:, 0]
            img = model.image_embedding(first)
            txt = model.text_embedding(captions, caption_mask)
            valid = pair_valid
            n_valid = mx.maximum(valid.sum(), 1.0)
            both = (valid[:, None] * valid[None, :]) > 0
            # rows whose captions are the same text are positives of each other, never negatives
            same = mx.logical_and(both, mx.all(captions[:, None, :] == captions[None, :, :], axis=-1))
            sim = img @ txt.T
            if self.contrastive_weight:
                logits = mx.where(both, sim * scale, -1e9)
                target = same.astype(mx.float32)
                target = target / mx.maximum(target.sum(axis=1, keepdims=True), 1.0)  # symmetric: same.T == same
                i2t = -(target * (logits - mx.logsumexp(logits, axis=1, keepdims=True))).sum(axis=1)
                t2i = -(target * (logits - mx.logsumexp(logits, axis=0, keepdims=True))).sum(axis=0)
                con = (0.5 * (i2t + t2i) * valid).sum() / n_valid
            if self.itm_weight:
                itm, acc = self._itm(model, first, captions, caption_mask, valid, mx.stop_gradient(sim), both, same)
        total = self.lm_weight * lm + self.contrastive_weight * con + self.itm_weight * itm
        # components with weight 0 are neither computed nor reported (identical zero outputs would also
        # trip mx.compile, which merges them into one)
        aux = {"temperature": n / scale} if self.contrastive_weight or self.itm_weight else {}
        if self.lm_weight:
            aux["lm_loss"] = lm * n
        if self.contrastive_weight:
            aux["contrastive_loss"] = con * n
        if self.itm_weight:
            aux |= {"itm_loss": itm * n, "itm_accuracy": acc * n}
        return total * n, n, aux

    def _itm(self, model, images, captions, caption_mask, valid, sim, both, same):
        B = images.shape[0]
        others = mx.logical_and(both, mx.logical_not(same))
        masked = mx.where(others, sim, -1e9)
        neg_txt = mx.argmax(masked, axis=1)  # per image: its hardest other caption
        neg_img = mx.argmax(masked, axis=0)  # per caption: its hardest other image
        has_neg = (others.sum(axis=1) > 0).astype(mx.float32) * valid
        has_neg_t = (others.sum(axis=0) > 0).astype(mx.float32) * valid
        tokens = model.projector(model.vision_features(images))  # [B, K, D]
        emb = model.language_model.model.embed_tokens(captions)
        ar = mx.arange(B)
        img_idx = mx.concatenate([ar, ar, neg_img])
        cap_idx = mx.concatenate([ar, neg_txt, ar])
        labels = mx.concatenate([mx.ones(B, mx.int32), mx.zeros(B, mx.int32), mx.zeros(B, mx.int32)])
        weight = mx.concatenate([valid, 0.5 * has_neg, 0.5 * has_neg_t])  # positives weigh as much as negatives
        logits = model.match_logits(tokens[img_idx], emb[cap_idx], caption_mask[cap_idx])
        ce = token_cross_entropy(logits, labels)
        w_sum = mx.maximum(weight.sum(), 1.0)
        loss = (ce * weight).sum() / w_sum
        acc = ((mx.argmax(logits, axis=-1) == labels).astype(mx.float32) * weight).sum() / w_sum
        return loss, acc
