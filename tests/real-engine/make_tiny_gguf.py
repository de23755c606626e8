"""Makes tiny random llama-architecture GGUF models for lmsd's real-engine tests.

They are real models to llama.cpp: they load in a fraction of a second, tokenize any text
(byte fallback), speak ChatML and generate thousands of tokens a second. Their weights are
random, so their words are nonsense, but temperature 0 gives the same output for the same
request. Their sizes differ so that memory-budget tests mean something.

usage: make_tiny_gguf.py OUT_DIR
"""

import os
import sys

import gguf
import numpy as np

# name: (embedding, layers, heads, feed-forward)
MODELS = {
    "tiny-a": (128, 2, 4, 256),
    "tiny-b": (256, 4, 4, 512),
    "tiny-c": (384, 6, 6, 768),
}

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary():
    """SPM pieces: specials, ChatML controls, 256 byte fallbacks, printable ASCII."""
    T = gguf.TokenType
    tokens = [("<unk>", T.UNKNOWN), ("<s>", T.CONTROL), ("</s>", T.CONTROL),
              ("<|im_start|>", T.CONTROL), ("<|im_end|>", T.CONTROL)]
    tokens += [(f"<0x{b:02X}>", T.BYTE) for b in range(256)]
    tokens += [("\u2581", T.NORMAL)]  # SPM's space
    tokens += [(chr(c), T.NORMAL) for c in range(0x21, 0x7F)]
    tokens += [("\u2581" + chr(c), T.NORMAL) for c in range(0x61, 0x7B)]  # " a" … " z"
    return tokens


def write_model(path, embd, layers, heads, ff, seed):
    rng = np.random.default_rng(seed)
    tokens = vocabulary()
    n_vocab = len(tokens)
    eos = [t for t, _ in tokens].index("<|im_end|>")

    def weights(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(path + ".tmp", arch="llama")
    w.add_name(os.path.basename(path)[:-len(".gguf")])
    w.add_context_length(2048)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(embd // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _ in tokens])
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types([int(kind) for _, kind in tokens])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML)

    w.add_tensor("token_embd.weight", weights(n_vocab, embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    output = weights(n_vocab, embd, scale=1.0)
    # Zero the rows of the control and byte tokens: their logits sit at the median of the random
    # others, so they are practically never picked. Replies are then never empty (no early
    # end-of-turn) and are printable ASCII (no stray bytes of broken UTF-8).
    output[: 5 + 256] = 0.0
    w.add_tensor("output.weight", output)
    for i in range(layers):
        blk = f"blk.{i}."
        w.add_tensor(blk + "attn_norm.weight", np.ones(embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(blk + name + ".weight", weights(embd, embd))
        w.add_tensor(blk + "ffn_norm.weight", np.ones(embd, dtype=np.float32))
        w.add_tensor(blk + "ffn_gate.weight", weights(ff, embd))
        w.add_tensor(blk + "ffn_up.weight", weights(ff, embd))
        w.add_tensor(blk + "ffn_down.weight", weights(embd, ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path + ".tmp", path)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for seed, (name, shape) in enumerate(sorted(MODELS.items())):
        path = os.path.join(out, name + ".gguf")
        write_model(path, *shape, seed=seed)
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
