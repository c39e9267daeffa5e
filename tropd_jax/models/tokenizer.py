"""The HF tokenizer of a checkpoint: chat-templated prompts in, responses out."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
import transformers

from tropd_jax import cli
from tropd_jax.models.safetensors_io import is_local

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model",
)
"""The files a checkpoint's tokenizer may consist of (all that is fetched of a hub id)."""
# Arguments of ``apply_chat_template`` that ``encode_prompt`` sets; not template options.
_RESERVED_TEMPLATE_ARGS = frozenset({
    "conversation", "messages", "add_generation_prompt", "tokenize", "return_dict",
    "return_tensors", "continue_final_message", "chat_template", "tools", "documents", "padding",
    "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
})


class Tokenizer:
  """A checkpoint's tokenizer with the pieces distillation needs.

  Attributes:
    hf: the underlying ``transformers`` tokenizer.
    source: where it was loaded from (for messages).
    vocab_size: the real vocabulary size (``len(hf)``), which may be smaller
      than a model's embedding rows.
    stop_ids: EOS and the chat template's end-of-turn token, deduplicated.
    pad_id: id used to pad (never attended to).
    chat_template_kwargs: options the chat template reads (e.g. Qwen3's
      ``{"enable_thinking": False}``), passed to every ``encode_prompt``.
  """

  def __init__(self, hf, source: str, chat_template_kwargs: Mapping[str, Any] | None = None):
    self.hf = hf
    self.source = source
    if hasattr(chat_template_kwargs, "to_dict"):  # An ml_collections.ConfigDict.
      chat_template_kwargs = chat_template_kwargs.to_dict()
    self.chat_template_kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(set(self.chat_template_kwargs) & _RESERVED_TEMPLATE_ARGS)
    if reserved:
      raise ValueError(
          f"chat template options {reserved} are set by tropd_jax itself; remove them from "
          "data.chat_template_kwargs.")
    if self.chat_template_kwargs and not hf.chat_template:
      raise ValueError(
          f"data.chat_template_kwargs={self.chat_template_kwargs} is set but the tokenizer of "
          f"{source} has no chat template to read it; leave data.chat_template_kwargs empty.")
    self.vocab_size = len(hf)
    stops = []
    for tok in (hf.eos_token, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
      tid = hf.convert_tokens_to_ids(tok) if tok else None
      if tid is not None and tid != hf.unk_token_id and tid not in stops:
        stops.append(tid)
    self.stop_ids = tuple(stops)
    self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else (stops or [0])[0]

  def encode_prompt(self, prompt: str | list[dict], *, system: str | None = None) -> list[int]:
    """Token ids of a user prompt (or a message list) with the chat template applied.

    The template gets ``chat_template_kwargs`` as variables. Without a chat template,
    the raw text of the last message is encoded.
    """
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None:
      messages = [{"role": "system", "content": system}, *messages]
    if self.hf.chat_template:
      ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **self.chat_template_kwargs)
      return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return self.encode(messages[-1]["content"])

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


@cli.reads_user_input
def load_tokenizer(path: str, *,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> Tokenizer:
  """Loads the tokenizer in a checkpoint directory (local, gs:// or hub id).

  Args:
    path: the checkpoint directory, gs:// URL or hub id.
    chat_template_kwargs: options for the chat template (``data.chat_template_kwargs``).
  """
  from tropd_jax.models.hf_io import resolve_checkpoint

  src = resolve_checkpoint(path, marker=None, files=TOKENIZER_FILES)
  local = src
  if not is_local(src):
    local = tempfile.mkdtemp(prefix="tropd_tok_")
    for fname in TOKENIZER_FILES:
      remote = f"{src}/{fname}"
      if fsspec.open(remote).fs.exists(remote):
        with fsspec.open(remote, "rb") as fi, open(os.path.join(local, fname), "wb") as fo:
          fo.write(fi.read())
  if not any(os.path.exists(os.path.join(local, f))
             for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
    raise FileNotFoundError(
        f"{path} has no tokenizer (tokenizer.json, vocab.json or tokenizer.model); "
        "copy the tokenizer files into the checkpoint directory."
    )
  return Tokenizer(transformers.AutoTokenizer.from_pretrained(local), str(path),
                   chat_template_kwargs)


@cli.reads_user_input
def check_same_tokenizer(
    teacher: Tokenizer, student: Tokenizer, teacher_rows: int, student_rows: int
) -> int:
  """Fails unless teacher and student share a tokenizer; returns its vocabulary size.

  Embedding tables may differ in rows (152064 vs 151936) while the tokenizer is
  the same: logits are then compared over the tokenizer's real vocabulary only.
  """
  if teacher.hf.get_vocab() != student.hf.get_vocab():
    raise ValueError(
        f"teacher tokenizer ({teacher.source}, {teacher.vocab_size} tokens) and student "
        f"tokenizer ({student.source}, {student.vocab_size} tokens) differ; on-policy "
        "distillation needs one shared tokenizer."
    )
  vocab = teacher.vocab_size
  for who, rows in (("teacher", teacher_rows), ("student", student_rows)):
    if rows < vocab:
      raise ValueError(
          f"{who} embedding has {rows} rows but the tokenizer has {vocab} tokens; "
          "the checkpoint does not match its tokenizer."
      )
  if teacher_rows != student_rows or teacher_rows != vocab:
    log.info(
        "teacher has %d embedding rows, student %d; comparing logits over the shared "
        "tokenizer's %d tokens (extra rows get no probability).", teacher_rows, student_rows,
        vocab,
    )
  return vocab
