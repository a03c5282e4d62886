"""``strategy: co_training``: BECO's boundary-enhanced co-training on noisy pseudo-masks.

attn2mask trains DeepLabv3+ on its generated images and pseudo-masks (255 = unreliable) with
BECO's official implementation (Rong et al., CVPR 2023; github.com/ShenghaiRong/BECO,
``models/train_beco.py`` and ``datasets/transforms/imgmix.py``). What runs here, per micro-batch:

- **Two networks**, A (``self.model``) and B, of the same architecture with different
  initialisations (torch seeds ``seed`` and ``seed + 1``; with a pretrained backbone only the
  fresh heads differ, as in BECO where both load the same ImageNet weights; ``model.init_from``
  loads A from ``model/`` and B from ``model_b/`` when the source has one, else the same weights
  as A), both DDP-wrapped,
  stepped by one optimizer (BECO: one SGD over network1 + network2).
- **Reliable / unreliable**: a pixel's pseudo-label is reliable where it is not 255 (BECO reads
  a separate confidence mask, ``irn_mask``; attn2mask writes 255 where it is not confident).
- **Losses** (BECO ``train_step``, ``reduction='none'`` then a mean over all pixels): each
  network's cross-entropy to the label on reliable pixels, weighted ``1 + w_label x boundary``,
  plus its cross-entropy to the *other* network's argmax on the unreliable pixels, weighted
  ``1 + w_cross x boundary``; the four terms summed. As in BECO, the cross-supervision target
  is the other network's argmax without a threshold; confidence enters through the online labels.
- **Image mixing with boundaries** (BECO ``imgmix_multi_with{mask,maskol}_bdry``): image i is
  paired with image i + B/2 (mod B); with probability ``mix_prob`` half of the partner's classes
  (rounded up, background and 255 excluded) are pasted into it. Before ``warmup_fraction`` of the
  iterations the pasted labels are the pseudo-masks and no boundary is weighted. Afterwards the
  two networks' mean prediction (eval mode, no gradient) labels every pixel; a pasted image takes
  those online labels, reliable where the top probability passes ``confidence``, the pasted
  classes are chosen among the partner's confident pixels, and the boundary is the pasted
  region's dilation minus its erosion with a (2 x ``boundary_size`` + 1)² square. Unmixed images
  keep their pseudo-masks.
- **Evaluation, ``best/`` and the exported model are network A** (``model/`` of a checkpoint, so
  ``evaluate`` / ``predict`` take it unchanged); B is saved in ``model_b/`` for resuming. BECO
  evaluates the mean of both networks' logits; here one network is what a run hands on.

Choices that differ: BECO's ``mix_aug`` (a colour augmentation of the mixed batch) is not applied
(``aug.photometric`` distorts colours in the ingest instead); the mixing draws come from a
generator seeded by (seed, rank, step, micro-batch), so a restarted run repeats them; BECO's
warm-up counts epochs, here a share of the iterations (1 of its 80 epochs); padding of a crop
(255) counts as unreliable, as a pseudo-mask's 255 does.
"""

from __future__ import annotations

from typing import Any

from core.schema import IGNORE_INDEX
from training.loop import MODEL_DIR, SegmentationRecipe

MODEL_B_DIR = "model_b"


def co_train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` for strategy=co_training."""
    CoTrainingRecipe(config).fit()


def boundary(alpha, size: int):
    """(B, H, W) float 0/1 region → its boundary band: dilation minus erosion with a
    (2 size + 1)² square (BECO getBoundry: cv2.dilate - cv2.erode; the image border does not
    erode, as cv2's default border). A region that is empty or everything has none."""
    import torch.nn.functional as F

    k = 2 * size + 1
    a = alpha[:, None]
    dilated = F.max_pool2d(a, k, stride=1, padding=size)
    eroded = -F.max_pool2d(-a, k, stride=1, padding=size)
    return (dilated - eroded)[:, 0]


def paste_region(label, gen, ignore_background: bool):
    """0/1 float (H, W): the pixels of half of ``label``'s classes (rounded up), drawn with
    ``gen`` (BECO random_cls_mask); 255 and (``ignore_background``) 0 never chosen."""
    import torch

    present = torch.unique(label).cpu()
    present = present[(present != IGNORE_INDEX) & ((present != 0) | (not ignore_background))]
    n = len(present)
    chosen = present[torch.randperm(n, generator=gen)[:(n + n % 2) // 2]].to(label.device)
    return torch.isin(label, chosen).float()


def mix_batch(x, labels, reliable, source, gen, ko, online: bool):
    """BECO's class mixing of a batch. ``labels`` / ``reliable`` (B, H, W): what an unmixed
    image is trained on (the pseudo-mask); ``source`` (labels, reliable): what a mixed image is
    trained on (the pseudo-mask before warm-up, the online labels after). Returns mixed pixels,
    labels, reliable mask and boundary band (zero before warm-up, as BECO)."""
    import torch

    b = x.shape[0]
    partner = torch.roll(torch.arange(b), b // 2)
    src_labels, src_reliable = source
    out_x, out_y, out_m, alphas = x.clone(), labels.clone(), reliable.clone(), torch.zeros_like(reliable)
    for i in range(b):
        if torch.rand((), generator=gen).item() >= ko.mix_prob:
            continue
        j = int(partner[i])
        pick = torch.where(src_reliable[j] > 0, src_labels[j], IGNORE_INDEX)
        a = paste_region(pick, gen, ko.ignore_background)
        out_x[i] = x[i] * (1 - a) + x[j] * a
        out_y[i] = torch.where(a > 0, src_labels[j], src_labels[i])
        out_m[i] = src_reliable[i] * (1 - a) + src_reliable[j] * a
        alphas[i] = a
    band = boundary(alphas, ko.boundary_size) if online else torch.zeros_like(alphas)
    return out_x, out_y, out_m, band


def co_training_loss(logits_a, logits_b, labels, reliable, band, ko):
    """BECO's four terms, summed: each network's CE to the label where reliable and to the
    other's argmax elsewhere, each weighted 1 + w x boundary, averaged over all pixels."""
    import torch.nn.functional as F

    y = labels.masked_fill(reliable <= 0, IGNORE_INDEX)
    total = 0.0
    for k, (mine, other) in enumerate(((logits_a, logits_b), (logits_b, logits_a))):
        ce = F.cross_entropy(mine, y, ignore_index=IGNORE_INDEX, reduction="none") * reliable
        total = total + (ce * (1 + ko.boundary_weight_label[k] * band)).mean()
        cross = F.cross_entropy(mine, other.argmax(1), reduction="none") * (1 - reliable)
        total = total + (cross * (1 + ko.boundary_weight_cross[k] * band)).mean()
    return total


def online_labels(nets, arch: str, x, size, confidence: float):
    """The networks' mean prediction in eval mode, no gradient: (argmax, top probability >
    ``confidence`` as 0/1 float); the networks are left in train mode."""
    import torch

    from training.models import predict

    with torch.no_grad():
        for net in nets:
            net.eval()
        probs = (sum(predict(net, arch, x, size) for net in nets) / len(nets)).softmax(1)
        for net in nets:
            net.train()
    top, arg = probs.max(1)
    return arg, (top > confidence).float()


def beco_loss(nets, arch: str, x, y, online: bool, gen, ko):
    """One micro-batch's BECO loss of networks ``nets`` = (A, B) on pixels ``x`` and pseudo-mask
    ``y`` (255 = unreliable): the pasted labels are the online ones once ``online`` (past the
    warm-up), the pseudo-mask before; mixing draws from ``gen``."""
    from training.models import predict

    reliable = (y != IGNORE_INDEX).float()
    size = y.shape[-2:]
    source = online_labels(nets, arch, x, size, ko.confidence) if online else (y, reliable)
    x, y, reliable, band = mix_batch(x, y, reliable, source, gen, ko, online)
    logits_a, logits_b = (predict(net, arch, x, size) for net in nets)
    return co_training_loss(logits_a, logits_b, y, reliable, band, ko)


class CoTrainingRecipe(SegmentationRecipe):
    """:class:`SegmentationRecipe` with a second network and BECO's loss (module docstring)."""

    def build_model(self, subdir: str = MODEL_DIR):
        import torch

        model = super().build_model(subdir)
        if subdir == MODEL_DIR:  # network B: another initialisation, its own checkpoint folder
            torch.manual_seed(self.cfg.seed + 1)
            self.model_b = super().build_model(MODEL_B_DIR)
        return model

    def networks(self) -> list:
        return [self.model, self.model_b]

    def _generator(self, micro: int):
        import torch

        gen = torch.Generator()
        gen.manual_seed(hash((self.cfg.seed, self.rank, self.step, micro)) % 2**63)
        return gen

    def micro_loss(self, x, y, micro: int):
        ko = self.cfg.co_training
        online = self.step >= ko.warmup_fraction * self.total
        return beco_loss(self.networks(), self.cfg.model.arch, x, y, online, self._generator(micro), ko)

    def checkpoint_writer(self, ph: dict[str, Any]):
        from training.models import save_model

        write, model_b = super().checkpoint_writer(ph), self.model_b

        def both(tmp):
            write(tmp)
            save_model(model_b, tmp / MODEL_B_DIR)

        return both
