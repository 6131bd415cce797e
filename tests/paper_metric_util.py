"""Random-weight files of the paper metrics' real architectures, written in each project's released format under its
released file name, for the tests to load through the real loading code.

- FID: torch-fidelity's Inception v3 (full size), convs re-initialised (He normal) so that features keep their
  scale through 90 layers (the default init shrinks them to ~1e-8).
- CSD: the CLIP ViT image tower + style/content projections in CSD's training-checkpoint layout
  ({'model_state_dict': {'module.backbone.*', ...}, 'args': Namespace}), at a small width (sizes come from the file).
- DreamSim: the package's own ViT-B/32 / ViT-B/16 (full size) and a LoRA adapter with non-zero B written in peft's
  saved layout with an older peft's adapter_config.json (as a 2023 release), for the open_clip_vitb32 and
  dino_vitb16 types; DINO's ViT-B/16 backbone file for the dino path.
- ImageReward: BLIP's ViT + BERT with cross-attention in ImageReward.pt's key layout, written from an explicit
  list of the original names (independent of the loader's renaming), at a small width, and a small WordPiece
  vocab.txt.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch
from torch import nn

VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "person", "painting",
         "cat", "dog", "red", "blue", "in", "the", "style", "##s", "portrait", "."]


def write_inception(folder: Path, seed: int = 0) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from idlora.models.fid_inception import FEATURE, FID_WEIGHTS
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        torch.manual_seed(seed)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / FID_WEIGHTS)
    return folder / FID_WEIGHTS


CSD_TINY = {"width": 64, "layers": 2, "heads": 1, "patch_size": 16, "image_size": 32, "mlp_ratio": 4.0,
            "output_dim": 32}


def write_csd(folder: Path, name: str = "checkpoint.pth", seed: int = 0, **sizes) -> Path:
    from idlora.models.csd import CSDStyleEncoder
    torch.manual_seed(seed)
    model = CSDStyleEncoder(**{**CSD_TINY, **sizes})
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP-wrapped, as CSD's training saves it
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": sd, "epoch": 1, "args": argparse.Namespace(arch="vit_large")}, folder / name)
    return folder / name


LORA_CONFIG = {"base_model_name_or_path": None, "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
               "inference_mode": True, "lora_alpha": 0.5, "lora_dropout": 0.3, "merge_weights": False,
               "modules_to_save": None, "peft_type": "LORA", "r": 16, "target_modules": ["qkv"],
               "task_type": "FEATURE_EXTRACTION"}  # an adapter_config.json of an older peft, as in a 2023 release


def write_adapter(folder: Path, seed: int = 0, extractors: int = 1) -> Path:
    """A DreamSim LoRA folder (adapter_config.json + adapter_model.bin) written by hand in peft's saved layout: rank
    16 on the qkv of the 12 ViT-B blocks of each of the first ``extractors`` extractors (the ensemble has 3), B
    non-zero (a trained adapter)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for e, i in ((e, i) for e in range(extractors) for i in range(12)):
        key = f"base_model.model.extractor_list.{e}.model.blocks.{i}.attn.qkv."
        sd[key + "lora_A.weight"] = torch.randn(16, 768, generator=g) * 768 ** -0.5
        sd[key + "lora_B.weight"] = torch.randn(3 * 768, 16, generator=g) * 0.5
    torch.save(sd, folder / "adapter_model.bin")
    return folder


def _half(sd: dict) -> dict:
    return {k: v.half() for k, v in sd.items()}  # half the bytes to write; load_state_dict casts back to float32


def write_clip_as_dino(path: Path, patch: int, seed: int = 0) -> Path:
    """A (open_)clip_vitb<patch>_pretrain.pth.tar: DreamSim's port of a CLIP ViT-B to its DINO ViT, with proj."""
    from dreamsim.feature_extraction.vision_transformer import vit_base
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vit = vit_base(patch_size=patch)
    vit.pos_drop = nn.LayerNorm(768)  # CLIP's ln_pre, where DreamSim's CLIP-as-DINO port keeps it
    sd = dict(_half(vit.state_dict()), proj=torch.randn(768, 512) * 768 ** -0.5)  # proj is used as stored: fp32
    torch.save({"state_dict": sd}, path)
    return path


def write_dreamsim_vitb32(folder: Path, seed: int = 0) -> Path:
    """open_clip_vitb32_pretrain.pth.tar + open_clip_vitb32_single_lora/ (DreamSim's release layout)."""
    write_clip_as_dino(folder / "open_clip_vitb32_pretrain.pth.tar", 32, seed)
    write_adapter(folder / "open_clip_vitb32_single_lora", seed)
    return folder


def write_dreamsim_ensemble(folder: Path, seed: int = 0) -> Path:
    """The ensemble type (DreamSim's default): DINO's backbone and dino_vitb16_pretrain.pth (write_dreamsim_dino),
    clip_vitb16_pretrain.pth.tar, open_clip_vitb16_pretrain.pth.tar and ensemble_lora/ (on all three extractors)."""
    write_dreamsim_dino(folder, seed)
    write_clip_as_dino(folder / "clip_vitb16_pretrain.pth.tar", 16, seed + 1)
    write_clip_as_dino(folder / "open_clip_vitb16_pretrain.pth.tar", 16, seed + 2)
    write_adapter(folder / "ensemble_lora", seed, extractors=3)
    return folder


def write_dreamsim_dino(folder: Path, seed: int = 0) -> Path:
    """The dino_vitb16 type: DINO's backbone (checkpoints/dino_vitbase16_pretrain.pth), DreamSim's
    dino_vitb16_pretrain.pth (DINO's training checkpoint: only the student head is read) and
    dino_vitb16_single_lora/."""
    write_dino_backbone(folder, seed)
    g = torch.Generator().manual_seed(seed)
    head = {"mlp.0": (2048, 768), "mlp.2": (2048, 2048), "mlp.4": (256, 2048)}  # DINOHead(768, 2048)
    student = {f"module.head.{k}.weight": torch.randn(*shape, generator=g) * 0.02 for k, shape in head.items()}
    student.update({f"module.head.{k}.bias": torch.zeros(shape[0]) for k, shape in head.items()})
    student["module.head.last_layer.weight"] = torch.randn(2048, 256, generator=g) * 256 ** -0.5
    torch.save({"student": student}, folder / "dino_vitb16_pretrain.pth")
    write_adapter(folder / "dino_vitb16_single_lora", seed)
    return folder


def write_dino_backbone(folder: Path, seed: int = 0) -> Path:
    """DINO's dino_vitbase16_pretrain.pth (ViT-B/16 state dict, no head), where torch.hub caches it."""
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from idlora.models.dreamsim_metric import DINO_BACKBONE
    torch.manual_seed(seed)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(_half(vit_base(patch_size=16, num_classes=0).state_dict()), folder / "checkpoints" / DINO_BACKBONE)
    return folder / "checkpoints" / DINO_BACKBONE


IR_TINY = {"vision_width": 128, "vision_layers": 2, "patch_size": 16, "image_size": 32, "text_width": 128,
           "text_layers": 2, "max_positions": 40}


def _blip_layout(v: int, vl: int, patch: int, image: int, t: int, tl: int, vocab: int, positions: int) -> dict:
    """Shapes of ImageReward.pt's tensors, by their original names (BLIP's ViT and BERT, ImageReward's mlp)."""
    shapes = {"blip.visual_encoder.cls_token": (1, 1, v),
              "blip.visual_encoder.pos_embed": (1, (image // patch) ** 2 + 1, v),
              "blip.visual_encoder.patch_embed.proj.weight": (v, 3, patch, patch),
              "blip.visual_encoder.patch_embed.proj.bias": (v,),
              "blip.visual_encoder.norm.weight": (v,), "blip.visual_encoder.norm.bias": (v,)}
    for i in range(vl):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (v,), b + "norm1.bias": (v,), b + "norm2.weight": (v,),
                       b + "norm2.bias": (v,),
                       b + "attn.qkv.weight": (3 * v, v), b + "attn.qkv.bias": (3 * v,), b + "attn.proj.weight": (v, v),
                       b + "attn.proj.bias": (v,), b + "mlp.fc1.weight": (4 * v, v), b + "mlp.fc1.bias": (4 * v,),
                       b + "mlp.fc2.weight": (v, 4 * v), b + "mlp.fc2.bias": (v,)})
    e = "blip.text_encoder.embeddings."
    shapes.update({e + "word_embeddings.weight": (vocab, t), e + "position_embeddings.weight": (positions, t),
                   e + "LayerNorm.weight": (t,), e + "LayerNorm.bias": (t,)})
    for i in range(tl):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in (("attention", t), ("crossattention", v)):
            shapes.update({f"{b}{att}.self.query.weight": (t, t), f"{b}{att}.self.query.bias": (t,),
                           f"{b}{att}.self.key.weight": (t, kv), f"{b}{att}.self.key.bias": (t,),
                           f"{b}{att}.self.value.weight": (t, kv), f"{b}{att}.self.value.bias": (t,),
                           f"{b}{att}.output.dense.weight": (t, t), f"{b}{att}.output.dense.bias": (t,),
                           f"{b}{att}.output.LayerNorm.weight": (t,), f"{b}{att}.output.LayerNorm.bias": (t,)})
        shapes.update({b + "intermediate.dense.weight": (4 * t, t), b + "intermediate.dense.bias": (4 * t,),
                       b + "output.dense.weight": (t, 4 * t), b + "output.dense.bias": (t,),
                       b + "output.LayerNorm.weight": (t,), b + "output.LayerNorm.bias": (t,)})
    widths = (t, 1024, 128, 64, 16, 1)
    for idx, (a, b_) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        shapes.update({f"mlp.layers.{idx}.weight": (b_, a), f"mlp.layers.{idx}.bias": (b_,)})
    return shapes


def write_image_reward(folder: Path, seed: int = 0, **sizes) -> Path:
    """ImageReward.pt (random, original key names; BLIP's extra parts and the position_ids buffer included, as
    in the release) and vocab.txt."""
    s = {**IR_TINY, **sizes}
    vocab = len(VOCAB) + 2  # BLIP adds [DEC] and [ENC]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in _blip_layout(s["vision_width"], s["vision_layers"], s["patch_size"], s["image_size"],
                                   s["text_width"], s["text_layers"], vocab, s["max_positions"]).items():
        is_norm_weight = key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight"))
        sd[key] = 1 + 0.1 * torch.randn(shape, generator=g) if is_norm_weight else \
            torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) > 1 else 0.02)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(s["max_positions"])[None]
    sd["blip.vision_proj.weight"] = torch.randn(256, s["vision_width"], generator=g)  # unused by the score
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def lora_b_of(folder: Path, adapter: str = "open_clip_vitb32_single_lora") -> dict:
    """The saved adapter's B matrices (to check that the loader applied them)."""
    sd = torch.load(folder / adapter / "adapter_model.bin", weights_only=True)
    return {k: v for k, v in sd.items() if "lora_B" in k}
