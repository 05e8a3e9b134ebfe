"""Benchmark evaluation (`tropd eval` and the trainer's periodic evaluation share `harness.evaluate`).

Modules: `passk` (unbiased pass@k, avg@k), `scorers` (math / multiple choice / code / reasoning-gym),
`sandbox` (run untrusted code with limits), `benchmarks` (load problem files, prompt formatting),
`harness` (`evaluate(engine, benchmark, ...) -> EvalResult`, output files), `cli` (`tropd eval`).
Import submodules directly; this package import stays light (no torch).
"""
