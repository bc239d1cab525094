"""Export the torch models of the deployment table (issue 12) to ONNX, with random weights.

Run in the zoo virtualenv (torch, torchvision, transformers; never a dependency of onnxlady)::

    /tmp/zoo-venv/bin/python -m tools.export_deployment_models [--out .cache/deployment] [--genai]

Writes, each with torch.onnx's TorchScript exporter (opset 17, static shapes, seeded weights):

- ``resnet18.onnx``: torchvision's ResNet-18 (``weights=None``), input ``[1, 3, 64, 64]``;
- ``bert.onnx``: a 2-layer BERT encoder from a ``transformers.BertConfig`` (hidden 64, 4 heads,
  weights drawn with standard deviation 0.1), inputs ``input_ids`` and ``attention_mask`` ``[1, 16]``;
- ``llama.onnx``: a 2-layer LLaMA-style decoder from a ``transformers.LlamaConfig`` (vocabulary
  160, hidden 64, 4 query heads over 2 KV heads, RoPE, SiLU-gated MLP), ``input_ids [1, 16]`` to
  logits, no KV cache;
- ``gpt2.onnx``: a 2-layer GPT-2 from a ``transformers.GPT2Config`` (hidden 64, 4 heads, weights
  with standard deviation 0.1), ``input_ids`` and ``attention_mask`` ``[1, 16]``: its Conv1D
  layers are Gemms between Reshapes, the packed ``c_attn`` split after its Reshape;
- ``whisper_encoder.onnx``: a 2-layer Whisper encoder (d_model 64, 20 mel bins, 100 frames,
  weights with standard deviation 0.1): two Conv1d, then attention whose query is scaled after
  its bias;
- ``torch_mha.onnx``: ``torch.nn.MultiheadAttention`` (embed 32, 4 heads) between two Linear
  layers, the packed ``in_proj_weight`` as torch exports it (constant folding cuts it into three
  weights); ``torch_mha_unfolded.onnx`` the same without constant folding (``Slice`` of
  ``in_proj_weight`` in the graph).

A model whose export fails is reported and skipped; the others are still written.

``--genai`` also saves that LLaMA-style decoder (the same seeded weights) as a Hugging Face folder
with a word-level tokenizer, and runs ONNX Runtime GenAI's model builder on it offline
(``python -m onnxruntime_genai.models.builder -i FOLDER -p fp32|int4 -e cpu``): ``genai_fp32/``
and ``genai_int4/`` (``model.onnx`` with GroupQueryAttention, SkipSimplifiedLayerNormalization,
rotary embeddings and KV-cache inputs and outputs; int4 as MatMulNBits). Needs
``onnxruntime-genai``, ``onnx_ir`` and ``onnxscript`` in the virtualenv.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(".cache/deployment")
SEQ = 16
#: The LLaMA decoder's vocabulary (not 128, its MLP width: see ``_llama``).
VOCAB = 160


def _resnet18() -> tuple[Any, tuple[Any, ...], list[str]]:
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return model, (torch.randn(1, 3, 64, 64),), ["input"]


def _bert() -> tuple[Any, tuple[Any, ...], list[str]]:
    import torch
    from transformers import BertConfig, BertModel

    # Weights drawn 5x wider than BERT's default (0.02): with the default, attention scores of a
    # random model are so small that softmax is near uniform and a wrong permutation of a key
    # projection hardly changes the output, which would make the table's check of it meaningless.
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, type_vocab_size=1,
                        initializer_range=0.1)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 128, (1, SEQ))
    return Hidden().eval(), (ids, torch.ones(1, SEQ, dtype=torch.int64)), ["input_ids", "attention_mask"]


def _llama() -> tuple[Any, tuple[Any, ...], list[str]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # The vocabulary differs from the MLP's width: GenAI's builder takes any Linear with as many
    # outputs as the vocabulary for the LM head (with both 128, layer 0's gate_proj became it).
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, tie_word_embeddings=False, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # An explicit mask and positions keep the export to operators the exporter knows.
            mask = torch.ones_like(input_ids)
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits

    return Logits().eval(), (torch.randint(0, VOCAB, (1, SEQ)),), ["input_ids"]


def _torch_mha() -> tuple[Any, tuple[Any, ...], list[str]]:
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(32, 32)
            self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.embed(x))
            attended, _ = self.attention(h, h, h, need_weights=False)
            return self.head(attended + h)

    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel has no ONNX export
    return Block().eval(), (torch.randn(1, SEQ, 32),), ["input"]


def _gpt2() -> tuple[Any, tuple[Any, ...], list[str]]:
    import torch
    from transformers import GPT2Config, GPT2Model

    # GPT-2's Conv1D layers export as Gemm between Reshapes; c_attn's packed Q, K, V is Split after it.
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                        initializer_range=0.1, attn_implementation="eager")  # fmt: skip
    model = GPT2Model(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state

    ids = torch.randint(0, VOCAB, (1, SEQ))
    return Hidden().eval(), (ids, torch.ones(1, SEQ, dtype=torch.int64)), ["input_ids", "attention_mask"]


def _whisper_encoder() -> tuple[Any, tuple[Any, ...], list[str]]:
    import torch
    from transformers import WhisperConfig, WhisperModel

    # The query projection is scaled by head_dim ** -0.5 after its bias (MatMul, Add, Mul).
    config = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=20,
                           max_source_positions=50, init_std=0.1, attn_implementation="eager")  # fmt: skip
    encoder = WhisperModel(config).get_encoder().eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_features).last_hidden_state

    return Hidden().eval(), (torch.randn(1, 20, 100),), ["input_features"]


MODELS: dict[str, Callable[[], tuple[Any, tuple[Any, ...], list[str]]]] = {
    "resnet18": _resnet18,
    "bert": _bert,
    "llama": _llama,
    "torch_mha": _torch_mha,
    "torch_mha_unfolded": _torch_mha,  # exported without constant folding: in_proj sliced in the graph
    "gpt2": _gpt2,
    "whisper_encoder": _whisper_encoder,
}
#: Models exported as torch.onnx writes them without constant folding.
UNFOLDED = {"torch_mha_unfolded"}


def export(name: str, out: Path) -> Path:
    """Build model ``name`` with seeded random weights and export it to ``out/NAME.onnx``."""
    import torch

    torch.manual_seed(0)
    model, args, inputs = MODELS[name]()
    path = out / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=["output"], opset_version=17,
                          dynamo=False, do_constant_folding=name not in UNFOLDED)  # fmt: skip
    return path


def genai(out: Path) -> list[Path]:
    """The LLaMA decoder through ONNX Runtime GenAI's builder, fp32 and int4 (see the module docstring)."""
    import os
    import subprocess

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    wrapper, _, _ = _llama()
    folder = out / "llama_hf"
    wrapper.model.save_pretrained(folder)
    words = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(folder)  # fmt: skip
    written = []
    for precision in ("fp32", "int4"):
        target = out / f"genai_{precision}"
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "llama-tiny", "-i", str(folder),
                   "-o", str(target), "-p", precision, "-e", "cpu", "-c", str(out / "genai_cache")]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        written.append(target / "model.onnx")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="export only these")
    parser.add_argument("--genai", action="store_true", help="also build the decoder with onnxruntime-genai")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in MODELS if args.only is None else args.only:
        try:
            print(f"{name}: {export(name, args.out)}")
        except Exception as exc:  # report and go on: one model's exporter failure is no reason to stop
            failed += 1
            print(f"{name}: export failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    if args.genai:
        try:
            for path in genai(args.out):
                print(f"genai: {path}")
        except Exception as exc:  # the builder is optional: say why it did not run
            failed += 1
            print(f"genai: build failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
