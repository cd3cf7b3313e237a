"""The ``splitserve`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from splitserve.cluster.cli.common import device_arg, device_problem, positive


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="run the engine in this process on one or more prompts",
                       description="Generate completions with the engine in this process. "
                                   "Without --model, uses the embedded default model "
                                   "(a small model trained on Python's standard library: it continues "
                                   "English prose and Python code).")
    p.add_argument("prompts", nargs="*", default=None, help="prompt texts (default: a sample prompt)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face repo id (org/name)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a repo id")
    p.add_argument("--max-tokens", type=positive(int), default=32, metavar="N",
                   help="tokens to generate per prompt")
    p.add_argument("--temperature", type=positive(float, allow_zero=True), default=0.0,
                   metavar="T", help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens with this much "
                        "probability, in (0, 1]")
    p.add_argument("--top-k", type=int, default=-1, metavar="K",
                   help="keep the K most likely tokens; -1 keeps all")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="where the engine runs: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV cache dtype; auto follows --dtype")
    p.add_argument("--block-size", type=positive(int), default=16, metavar="TOKENS",
                   help="tokens per KV block")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.errors import SplitserveError
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    prompts = args.prompts or ["The quick brown fox"]
    problem = device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.model:
            from splitserve.engine.hub import resolve_checkpoint

            model = str(resolve_checkpoint(args.model, args.revision))
        else:
            model = str(default_model_path())
        eng = LLMEngine(EngineConfig(model=model, model_id=args.model, device=args.device,
                                     dtype=args.dtype,
                                     kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size))
        if args.chat:  # the rendered template carries its own special tokens
            inputs = [eng.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        else:
            inputs = list(prompts)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        t0 = time.perf_counter()
        results = eng.generate(inputs, params)
        dt = time.perf_counter() - t0
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_out = sum(len(r.token_ids) for r in results)
    for p, r in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": p, "text": r.text, "token_ids": r.token_ids,
                              "finish_reason": r.finish_reason}))
        else:
            print(f"--- prompt: {p!r}\n{r.text}\n[finish_reason={r.finish_reason}, "
                  f"tokens={len(r.token_ids)}]")
    print(f"model={eng.model_id} device={eng.device} requests={len(results)} "
          f"output_tokens={n_out} time={dt:.3f}s tokens/s={n_out / dt:.1f}",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def _add_serve(sub) -> None:
    from splitserve.cluster.cli.serve_args import add_serve_flags

    p = sub.add_parser("serve", help="start a local cluster and serve the OpenAI HTTP and gRPC APIs",
                       description="Start Ray on this machine (or join --address), deploy the "
                                   "prefill and decode pools, the router and the ingress, and serve "
                                   "until interrupted. Serves MODEL (a checkpoint directory or a "
                                   "Hugging Face repo id), else the --config file's models, else "
                                   "the embedded default model (small, trained), with one prefill "
                                   "and one decode replica. Flags override the file's keys.")
    add_serve_flags(p)
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="join a running Ray cluster instead (default: start one here)")
    p.add_argument("--num-cpus", type=positive(int), default=None, metavar="N",
                   help="CPUs of the local Ray node (default: this machine's, at least 4)")
    p.add_argument("--smoke", action="store_true",
                   help="send one request through each API once ready, print it, and exit")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import os
    import signal

    from splitserve.cluster.cli.serve_args import config_from_args, config_yaml
    from splitserve.cluster.config import ConfigError

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(config_yaml(cfg))
        return 0
    import ray

    from splitserve.cluster.serve import app
    from splitserve.cluster.serve.http_proxy import served_by, url

    ep = cfg.endpoints
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.address:
        from splitserve.cluster.cli.common import check_reachable

        try:
            check_reachable(args.address)
        except ConnectionError as e:
            print(f"error: --address: cannot connect to the Ray cluster: {e}", file=sys.stderr)
            return 1
        ray.init(address=args.address, namespace="splitserve", log_to_driver=False)
    else:
        # a single-machine cluster: workers talk over loopback only
        ray.init(num_cpus=args.num_cpus or max(4, os.cpu_count() or 1), namespace="splitserve",
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"SPLITSERVE_BIND_HOST": "127.0.0.1"}})
    t0 = time.time()
    print("deploying: " + ", ".join(f"{m.model.name} ({m.mode})" for m in cfg.models), flush=True)
    try:
        app.deploy(cfg)
    except Exception as e:  # noqa: BLE001 - report and tear down
        print(f"error: deploy failed: {e}", file=sys.stderr)
        app.shutdown()
        return 1
    base = url(ep)
    name = cfg.models[0].model.name
    # with keys configured a request without one is refused (401): the
    # hint carries the header, not the key (it may be a file's or a variable's)
    auth = " -H 'Authorization: Bearer <API key>'" if cfg.auth.has_api_keys() else ""
    print(f"ready in {time.time() - t0:.0f}s\n"
          f"  OpenAI HTTP API: {base}/v1  (models: {', '.join(m.model.name for m in cfg.models)}; "
          f"{served_by(ep)})\n"
          f"  gRPC API:        {ep.host}:{ep.grpc_port}\n"
          f"  Ray:             {ray.get_runtime_context().gcs_address}  (splitserve status "
          f"--address ...)\n"
          f"  try: curl {base}/v1/completions{auth} -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
    if args.smoke:
        from splitserve.cluster.cli.smoke import smoke_test

        ok = smoke_test(cfg)
        app.shutdown()
        ray.shutdown()
        return 0 if ok else 1
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop["now"]:
        time.sleep(0.5)
    print("shutting down", flush=True)
    app.shutdown()
    ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from splitserve.cluster.cli.common import HelpFormatter

    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated LLM serving on Ray.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_generate(sub)
    from splitserve.cluster.cli.bench import add_subcommand as add_bench
    from splitserve.cluster.cli.ops import add_subcommands as add_ops
    from splitserve.cluster.cli.planning import add_subcommands as add_planning

    add_ops(sub)
    add_bench(sub)
    from splitserve.cluster.cli.plan import add_subcommand as add_plan

    add_planning(sub)
    add_plan(sub)
    for p in sub.choices.values():  # one help layout: each option with its default
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status. A bad argument exits 2 with
    argparse's usage line; an interrupt (Ctrl-C, SIGTERM) ends the command
    with one line and 130 / 143, without a traceback."""
    import threading

    from splitserve.cluster.cli.common import Interrupted, install_interrupt_handlers

    args = build_parser().parse_args(argv)
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = install_interrupt_handlers()
    try:
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else 2
        print(f"\nsplitserve {args.command}: interrupted", file=sys.stderr, flush=True)
        return 128 + signum
    except BrokenPipeError:  # `splitserve ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if restore is not None:  # main() called in process (tests) leaves them as found
            restore()


if __name__ == "__main__":
    sys.exit(main())
