"""A tiny PixArt-α pipeline built from configs, for offline CPU tests (no downloads).

Same classes and folder layout as PixArt-alpha/PixArt-XL-2-512x512 (T5 encoder + tokenizer,
AutoencoderKL, PixArtTransformer2DModel with learned sigma, a scaled_linear ε-prediction
scheduler), shrunk to a few thousand parameters: 8x8 latents, 16x16 images.
"""
import os

import numpy as np
import torch
from PIL import Image

WORDS = "a photo of red green blue cat dog bird house tree car on the in with small big".split()


def make_tokenizer():
    """A Unigram tokenizer (T5's model type) trained in-process, wrapped as T5's fast tokenizer (pad=0, eos=1, unk=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainers.UnigramTrainer(
        vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def make_pipeline(seed: int = 0, num_layers: int = 4, heads: int = 2, head_dim: int = 8, caption_channels: int = 32,
                  sample_size: int = 8, use_additional_conditions: bool = False):
    """heads x head_dim is the transformer's width (and its cross-attention width, as in PixArt-α);
    caption_channels is the T5 width; sample_size the latent size (images: 2x, the tiny VAE's factor)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=caption_channels, d_kv=8, d_ff=64,
                                           num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                                           decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=2 * sample_size)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=heads * head_dim, caption_channels=caption_channels, sample_size=sample_size, patch_size=2,
        norm_num_groups=4, use_additional_conditions=use_additional_conditions)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            prediction_type="epsilon", num_train_timesteps=1000)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)


def save_pipeline(path: str, seed: int = 0, **sizes) -> str:
    make_pipeline(seed, **sizes).save_pretrained(path)
    return path


def make_image_folder(path: str, n: int = 6, seed: int = 0) -> str:
    """n 16x16 images (coloured squares) + metadata.jsonl with {"file_name", "text"}, HF imagefolder style."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    lines = []
    for i in range(n):
        name = list(colours)[i % 3]
        img = np.full((16, 16, 3), 128, np.uint8)
        x, y = rng.integers(0, 8, 2)
        img[y:y + 8, x:x + 8] = colours[name]
        Image.fromarray(img).save(os.path.join(path, f"{i}.png"))
        lines.append(f'{{"file_name": "{i}.png", "text": "a photo of a {name} house"}}')
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    # python tests/tiny_pixart.py DIR: DIR/pipeline and DIR/data, for `finetune_t2i.py --preset smoke`
    import sys
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-pixart"
    save_pipeline(os.path.join(out, "pipeline"))
    make_image_folder(os.path.join(out, "data"), n=8)
    print(f"python finetune_t2i.py --preset smoke --base {out}/pipeline --data {out}/data --out runs/smoke-t2i")
