"""Random-weight files of the paper metrics' real architectures, written in each project's released format under its
released file name, for the tests to load through the real loading code.

- FID: torch-fidelity's Inception v3 (full size), convs re-initialised (He normal) so that features keep their
  scale through 90 layers (the default init shrinks them to ~1e-8).
- CSD: the CLIP ViT image tower + style/content projections in CSD's training-checkpoint layout
  ({'model_state_dict': {'module.backbone.*', ...}, 'args': Namespace}), at a small width (sizes come from the file).
- DreamSim: the package's own ViT-B/32 (full size) and a peft LoRA adapter with non-zero B, for the
  open_clip_vitb32 type; DINO's ViT-B/16 backbone file for the dino path.
- ImageReward: BLIP's ViT + BERT with cross-attention in ImageReward.pt's key layout, written from an explicit
  list of the original names (independent of the loader's renaming), at a small width, and a small WordPiece
  vocab.txt.
"""
from __future__ import annotations

import argparse
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


def write_dreamsim_vitb32(folder: Path, seed: int = 0) -> Path:
    """open_clip_vitb32_pretrain.pth.tar + open_clip_vitb32_single_lora/ (DreamSim's release layout)."""
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vit = vit_base(patch_size=32)
    vit.pos_drop = nn.LayerNorm(768)  # CLIP's ln_pre, where DreamSim's CLIP-as-DINO port keeps it
    sd = dict(vit.state_dict(), proj=torch.randn(768, 512) * 768 ** -0.5)
    torch.save({"state_dict": sd}, folder / "open_clip_vitb32_pretrain.pth.tar")
    base = PerceptualModel(**dreamsim_args["model_config"]["open_clip_vitb32"], device="cpu", load_dir=str(folder),
                           normalize_embeds=True)
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none",
                                                 target_modules=["qkv"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)  # peft starts B at zero; a trained adapter is not
    peft_model.save_pretrained(str(folder / "open_clip_vitb32_single_lora"))
    return folder


def write_dreamsim_dino(folder: Path, seed: int = 0) -> Path:
    """The dino_vitb16 type: DINO's backbone (checkpoints/dino_vitbase16_pretrain.pth), DreamSim's
    dino_vitb16_pretrain.pth (DINO's training checkpoint: only the student head is read) and
    dino_vitb16_single_lora/."""
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import DINOHead
    from dreamsim.model import PerceptualModel
    from idlora.models.dreamsim_metric import _local_hub_load
    from peft import LoraConfig, get_peft_model
    write_dino_backbone(folder, seed)
    head = DINOHead(768, 2048)
    student = {f"module.head.{k}": v for k, v in head.state_dict().items() if not k.startswith("last_layer")}
    student["module.head.last_layer.weight"] = torch.randn(2048, 256) * 256 ** -0.5
    torch.save({"student": student}, folder / "dino_vitb16_pretrain.pth")
    hub_dir = torch.hub.get_dir()
    with mock.patch.object(torch.hub, "load", _local_hub_load(folder)):
        base = PerceptualModel(**dreamsim_args["model_config"]["dino_vitb16"], device="cpu", load_dir=str(folder),
                               normalize_embeds=True)
    torch.hub.set_dir(hub_dir)
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none",
                                                 target_modules=["qkv"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(str(folder / "dino_vitb16_single_lora"))
    return folder


def write_dino_backbone(folder: Path, seed: int = 0) -> Path:
    """DINO's dino_vitbase16_pretrain.pth (ViT-B/16 state dict, no head), where torch.hub caches it."""
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from idlora.models.dreamsim_metric import DINO_BACKBONE
    torch.manual_seed(seed)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(vit_base(patch_size=16, num_classes=0).state_dict(), folder / "checkpoints" / DINO_BACKBONE)
    return folder / "checkpoints" / DINO_BACKBONE


IR_TINY = {"vision_width": 128, "vision_layers": 2, "patch_size": 16, "image_size": 32, "text_width": 128,
           "text_layers": 2, "max_positions": 40}


def _blip_layout(v: int, vl: int, patch: int, image: int, t: int, tl: int, vocab: int, positions: int) -> dict:
    """Shapes of ImageReward.pt's tensors, by their original names (BLIP's ViT and BERT, ImageReward's mlp)."""
    shapes = {"blip.visual_encoder.cls_token": (1, 1, v), "blip.visual_encoder.pos_embed": (1, (image // patch) ** 2 + 1, v),
              "blip.visual_encoder.patch_embed.proj.weight": (v, 3, patch, patch),
              "blip.visual_encoder.patch_embed.proj.bias": (v,),
              "blip.visual_encoder.norm.weight": (v,), "blip.visual_encoder.norm.bias": (v,)}
    for i in range(vl):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (v,), b + "norm1.bias": (v,), b + "norm2.weight": (v,), b + "norm2.bias": (v,),
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
    from safetensors.torch import load_file
    sd = load_file(str(folder / adapter / "adapter_model.safetensors"))
    return {k: v for k, v in sd.items() if "lora_B" in k}
