"""The OpenAI-compatible server (`python -m alignment.serve`), which uses this file when no --config is given.

    python -m alignment.serve --config.checkpoint=embedded
    python -m alignment.serve --config.checkpoint=/models/qwen2-hf --config.port=8000
    python -m alignment.serve --config=configs/serve.py --config.checkpoint=/tmp/sft/checkpoints \
        --config.pas=/tmp/pas/pas_model --verbosity=1

It prints its address and one line per request; --verbosity=1 adds the libraries' (JAX, Orbax) log lines.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.checkpoint = "embedded"  # 'embedded' (random tiny model), a run or checkpoint directory, or a HF directory
    c.model = "tiny"  # configs/models preset for Orbax checkpoints and 'embedded' (a HF directory has its own)
    c.tokenizer = ""  # '' = the HF directory's, else 'embedded'; or a SentencePiece .model, tokenizer.json, directory
    c.chat_template = ""  # llama2 | llama3 | chatml; '' = the checkpoint's (model.json or HF tokens), else chatml
    c.seed = 0  # random init of checkpoint='embedded'
    c.host = "127.0.0.1"  # address to listen on; 0.0.0.0 for every interface
    c.port = 8000  # port to listen on; 0 = any free port (the address line says which)
    c.served_model_name = ""  # comma-separated `model` names requests may give, first reported; '' = dir name, default
    c.max_tokens = 256  # new tokens when a request does not say
    c.max_connections = 64  # connections served at once; more get 503
    c.slots = 64  # sequences decoding together in the engine's batch (requests and their n samples share it)
    c.max_waiting = 256  # sequences that may wait for a slot; a request beyond gets 429
    c.read_timeout = 30.0  # seconds a socket read may wait (an idle keep-alive connection is closed after it)
    c.pas = ""  # PAS model in front of chat requests: a pas run's pas_model directory or an API root; '' = off
    return c
