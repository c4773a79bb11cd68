"""Build whole original-layout Wan 2.1 repo folders from the fixtures, as the Hub repos lay them
out: transformer weights and config.json at the root, the .pth files beside them, the tokenizer
folders, and the files the real repos carry that a converter must ignore."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

from conftest import FIXTURES

T5_PTH = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_PTH = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_PTH = "Wan2.1_VAE.pth"


def make_umt5_tokenizer(folder: Path, vocab_size: int = 40) -> None:
    """A tiny umT5-style (sentencepiece unigram) tokenizer, made offline: spiece.model plus the
    tokenizer.json / tokenizer_config.json that transformers writes, as in google/umt5-xxl/."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    rng = random.Random(0)
    words = ["astronaut", "dancing", "moon", "earth", "cat", "dog", "video", "red", "blue", "walks",
             "on", "the", "a", "beach", "sunset", "city", "night", "rain", "forest", "river"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder))


VAE22_PTH = "Wan2.2_VAE.pth"
EXPERTS = ("high_noise_model", "low_noise_model")
WAN22 = ("t2v_a14b", "i2v_a14b", "ti2v_5b")


def copy_transformer(fixture: Path, dest: Path) -> None:
    """The transformer files of a fixture folder (weights, index, config), as the repo has them."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in fixture.iterdir():
        if f.name.startswith("diffusion_pytorch_model") or f.name == "config.json":
            shutil.copy(f, dest / f.name)


def make_original_repo(root: Path, variant: str, with_tokenizer: bool = True) -> Path:
    """`variant`: t2v, i2v, flf2v or vace (Wan 2.1), t2v_a14b, i2v_a14b or ti2v_5b (Wan 2.2: the
    A14B repos keep their experts in high_noise_model/ and low_noise_model/ and use the Wan 2.1 VAE;
    TI2V-5B has the Wan 2.2 VAE). The transformer fixture(s) of that name are used."""
    root.mkdir(parents=True, exist_ok=True)
    if variant in ("t2v_a14b", "i2v_a14b"):
        for expert in EXPERTS:
            copy_transformer(FIXTURES / variant / expert, root / expert)
    else:
        copy_transformer(FIXTURES / variant, root)
    if variant == "ti2v_5b":
        shutil.copy(FIXTURES / "vae22" / VAE22_PTH, root / VAE22_PTH)
    else:
        shutil.copy(FIXTURES / "vae" / VAE_PTH, root / VAE_PTH)
    shutil.copy(FIXTURES / "t5" / T5_PTH, root / T5_PTH)
    if variant in ("i2v", "flf2v"):
        shutil.copy(FIXTURES / "clip" / CLIP_PTH, root / CLIP_PTH)
        xlmr = root / "xlm-roberta-large"  # the CLIP text tower's tokenizer: not used by Diffusers
        xlmr.mkdir()
        (xlmr / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    if with_tokenizer:
        make_umt5_tokenizer(root / "google" / "umt5-xxl")
    (root / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# Wan{'2.2' if variant in WAN22 else '2.1'}\n")
    (root / "configuration.json").write_text(json.dumps({"framework": "Pytorch", "task": "text-to-video"}))
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (root / "assets").mkdir()
    (root / "assets" / "logo.png").write_bytes(b"\x89PNG\r\n")
    (root / "examples").mkdir()
    (root / "examples" / "i2v_input.JPG").write_bytes(b"\xff\xd8\xff")
    return root
