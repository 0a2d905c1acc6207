"""Talk to a gonka-p2p network with the unmodified official ``openai`` SDK.

Start a participant with the gateway (``gonka-p2p node --http 127.0.0.1:8000 ...``;
it prints ``HTTP <base url>``), then::

    .venv/bin/python examples/openai_sdk.py http://127.0.0.1:8000/v1 "Hello!"

Two things differ from talking to OpenAI: ``base_url``, and the signing hook on the
HTTP client. ``GonkaAuth`` signs every request with your key (``--key``, created if
missing) so the ledger charges your account; the key never leaves this process, and
the API key the SDK insists on is not used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import openai

from gonka_p2p.identity import Keypair
from gonka_p2p.inference.model_names import DEFAULT_MODEL
from gonka_p2p.openai.auth import GonkaAuth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="the node's gateway, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("prompt")
    parser.add_argument("--key", default="client.key", help="client key file")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chain-id", help="sign for this network only (default: the one the gateway states)")
    args = parser.parse_args()

    key = Keypair.load_or_create(Path(args.key))
    client = openai.OpenAI(base_url=args.base_url, api_key="unused",
                           http_client=httpx.Client(auth=GonkaAuth(key, args.chain_id)))
    usage = None
    try:
        stream = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": args.prompt}],
            max_tokens=args.max_tokens, temperature=args.temperature, stream=True, stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            usage = chunk.usage or usage
    except openai.APIError as e:
        print(f"\nerror ({e.code}): {e.message}", file=sys.stderr)
        return 1
    if usage is not None:
        print(f"\n[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
