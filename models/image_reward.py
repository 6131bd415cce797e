"""ImageReward (Xu et al. 2023), the text-image preference score DiffLoRA (003) reports, from the user's files.

Why not the project's PyPI package (``image-reward==1.5``): it pins ``timm==0.6.13`` (the pack runs timm 1.0)
and pulls ``fairscale`` and ``datasets``, and its model constructor downloads ``bert-base-uncased``'s tokenizer
and ``med_config.json`` from the Hugging Face hub. The network is BLIP (ViT-L/16 image encoder, a BERT-base text
encoder with cross-attention to the image tokens) and a 5-layer linear head on the text encoder's [CLS] state,
normalised by the published mean and std. transformers ships exactly these BLIP blocks (``BlipVisionModel``,
``BlipTextModel`` with ``is_decoder`` cross-attention, the classes of its BLIP ITM model), so IDLoRA builds them
there and maps ImageReward's key names (BLIP's original ``visual_encoder.blocks.N.attn.qkv`` / BERT's
``text_encoder.encoder.layer.N...``) onto them; checked to give the same numbers as the package's own BLIP code.

Files in ``models/image_reward/`` (``IMAGE_REWARD_FILES``):
    ImageReward.pt   the released weights (THUDM/ImageReward), a state dict with 'blip.*' and 'mlp.*' keys
    vocab.txt        bert-base-uncased's WordPiece vocabulary (the tokenizer ImageReward uses; a file of the
                     google-bert/bert-base-uncased repository)
The sizes (ViT width/depth/patch, BERT width/depth, vocabulary) are read from ImageReward.pt; med_config.json
is not needed.

Score: prompts tokenized to 35 tokens (padding and truncation, as ImageReward), images CLIP-preprocessed at the
ViT's size (224 px), reward = (head(text_cls) - 0.16717362830052426) / 1.0333394966054072; higher is better.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .csd import CLIP_MEAN, CLIP_STD
from .face_embed import read_state_dict
from .metric_files import ModelFilesMissing, find_model_file, missing_message

log = logging.getLogger(__name__)

IMAGE_REWARD_WEIGHTS = "ImageReward.pt"
IMAGE_REWARD_VOCAB = "vocab.txt"
IMAGE_REWARD_FILES = (IMAGE_REWARD_WEIGHTS, IMAGE_REWARD_VOCAB)
IMAGE_REWARD_SOURCE = ("ImageReward.pt from THUDM/ImageReward and vocab.txt from "
                       "google-bert/bert-base-uncased (its tokenizer)")
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's published normalisation
MAX_TOKENS = 35
HEAD_WIDTHS = (1024, 128, 64, 16, 1)

_VISION_RENAMES = [  # BLIP's ViT (timm layout) -> transformers' BlipVisionModel
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _head(width: int = 768) -> nn.Sequential:
    """ImageReward's head on the text [CLS] state (768 wide in the release): Linear layers with dropout between
    them and no activation (as released); indices 0, 2, 4, 6, 7 are the Linear layers of its 'mlp.layers.N'."""
    w = (width,) + HEAD_WIDTHS
    return nn.Sequential(nn.Linear(w[0], w[1]), nn.Dropout(0.2), nn.Linear(w[1], w[2]), nn.Dropout(0.2),
                         nn.Linear(w[2], w[3]), nn.Dropout(0.1), nn.Linear(w[3], w[4]), nn.Linear(w[4], w[5]))


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt's keys -> ``ImageRewardModel``'s ('vision.*', 'text.*', 'head.*'); the BLIP parts the
    score does not use (contrastive projections, momentum encoders, queues) are dropped."""
    out = {}
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, repl in _VISION_RENAMES:
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            out["vision." + name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            out["head." + key.removeprefix("mlp.layers.")] = value
    return out


def model_sizes(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Vision and text sizes of a converted state dict."""
    need = ("vision.embeddings.patch_embedding.weight", "vision.embeddings.position_embedding",
            "text.embeddings.word_embeddings.weight", "text.embeddings.position_embeddings.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"not an ImageReward checkpoint: no {absent} after mapping its 'blip.*' keys")
    width, _, patch, _ = sd["vision.embeddings.patch_embedding.weight"].shape
    vocab, text_width = sd["text.embeddings.word_embeddings.weight"].shape
    count = lambda prefix: len({k.split(".")[3] for k in sd if k.startswith(prefix)})  # noqa: E731
    return {"vision_width": width, "vision_layers": count("vision.encoder.layers."), "patch_size": patch,
            "image_size": patch * math.isqrt(sd["vision.embeddings.position_embedding"].shape[1] - 1),
            "vision_mlp": sd["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "vocab_size": vocab, "text_width": text_width, "text_layers": count("text.encoder.layer."),
            "text_mlp": sd["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_positions": sd["text.embeddings.position_embeddings.weight"].shape[0]}


class ImageRewardModel(nn.Module):
    """BLIP image + cross-attending text encoder (transformers' classes) and ImageReward's head."""

    def __init__(self, vision_width=1024, vision_layers=24, patch_size=16, image_size=224, vision_mlp=4096,
                 vocab_size=30524, text_width=768, text_layers=12, text_mlp=3072, max_positions=512):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
        self.image_size = image_size
        vision = BlipVisionConfig(hidden_size=vision_width, intermediate_size=vision_mlp,
                                  num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_width // 64),
                                  image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-6,
                                  hidden_act="gelu")
        text = BlipTextConfig(vocab_size=vocab_size, hidden_size=text_width, encoder_hidden_size=vision_width,
                              intermediate_size=text_mlp, num_hidden_layers=text_layers,
                              num_attention_heads=max(1, text_width // 64), max_position_embeddings=max_positions,
                              layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True)  # builds cross-attention
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.head = _head(text_width)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Preprocessed images and their tokenized prompts -> ``(B,)`` normalised rewards."""
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return ((self.head(text[:, 0].float()) - REWARD_MEAN) / REWARD_STD)[:, 0]


def load_image_reward_model(path: str | Path, device: str | torch.device = "cpu") -> ImageRewardModel:
    """ImageRewardModel with the weights of ImageReward.pt (every used key must be present)."""
    sd = convert_state_dict(read_state_dict(path, hint=f"expected {IMAGE_REWARD_SOURCE}"))
    model = ImageRewardModel(**model_sizes(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit ImageReward's BLIP: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(vocab: str | Path):
    """bert-base-uncased's tokenizer from its vocab.txt, with BLIP's two added tokens ([DEC], [ENC])."""
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab_file=str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def find_image_reward_folder(dirs: Sequence[str | Path]) -> Path:
    """The first of ``dirs`` with both ImageReward.pt and vocab.txt; else ModelFilesMissing naming what lacks."""
    folder = next((Path(d) for d in dirs if all((Path(d) / f).is_file() for f in IMAGE_REWARD_FILES)), None)
    if folder is None:
        lacking = [f for f in IMAGE_REWARD_FILES if not any((Path(d) / f).is_file() for d in dirs)]
        raise ModelFilesMissing(missing_message("ImageReward", lacking or list(IMAGE_REWARD_FILES), dirs,
                                                IMAGE_REWARD_SOURCE))
    return folder


class ImageRewardScorer:
    """ImageReward from a folder with ImageReward.pt and vocab.txt: ``score(images01, prompts) -> (B,)``."""

    def __init__(self, dirs: Sequence[str | Path], device: str | torch.device = "cpu"):
        folder = find_image_reward_folder(dirs)
        self.device = torch.device(device)
        self.path = find_model_file("ImageReward", IMAGE_REWARD_WEIGHTS, [folder], IMAGE_REWARD_SOURCE)
        self.model = load_image_reward_model(self.path, self.device)
        self.tokenizer = load_tokenizer(folder / IMAGE_REWARD_VOCAB)
        vocab = self.model.text.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"{folder / IMAGE_REWARD_VOCAB} has {len(self.tokenizer)} tokens with BLIP's two, but "
                             f"{self.path.name} embeds {vocab}: use bert-base-uncased's vocab.txt")
        self.name = f"ImageReward ({self.path.name})"

    def pixels(self, images01: torch.Tensor) -> torch.Tensor:
        from ..training.evaluate import vision_pixels
        return vision_pixels(images01.to(self.device), self.model.image_size, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def score(self, images01: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images01.shape[0]:
            raise ValueError(f"ImageReward pairs image i with prompt i: {images01.shape[0]} images vs "
                             f"{len(prompts)} prompts")
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(self.device)
        return self.model(self.pixels(images01), tokens.input_ids, tokens.attention_mask).float().cpu()
