"""Send one chat request to a running gonka-p2p network and stream the answer.

    .venv/bin/python examples/chat_client.py /ip4/127.0.0.1/tcp/9000/p2p/<peer id> "Hello!"

The first argument is any participant's multiaddr (its node prints it as
``READY <multiaddr>``); that participant's transfer agent routes the request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gonka_p2p.client import GonkaClient, GonkaError
from gonka_p2p.inference.model_names import DEFAULT_MODEL


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="multiaddr of a participant, ending in /p2p/<peer id>")
    parser.add_argument("prompt")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chain-id", help="sign for this network only (default: the one the TA states)")
    args = parser.parse_args()
    try:
        async with await GonkaClient.connect(args.bootstrap, chain_id=args.chain_id) as client:
            completion = await client.chat(
                [("user", args.prompt)], on_text=lambda t: print(t, end="", flush=True),
                model=args.model, max_tokens=args.max_tokens, temperature=args.temperature,
            )
    except GonkaError as e:
        print(f"error ({e.code}): {e}", file=sys.stderr)
        return 1
    print(f"\n[executor {completion.executor}, {completion.completion_tokens} tokens, "
          f"TTFT {completion.ttft_s * 1000:.0f} ms, {completion.tokens_per_s:.1f} tokens/s]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
