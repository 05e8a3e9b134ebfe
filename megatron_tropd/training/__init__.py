"""The training core. One step, in the order it runs:

    batch.build_batch -> scoring (TeacherScorer, student old log-probs) -> step.distill_step (schedule + objective
    + optimizer) -> loop.train_step (rollouts, weight sync, metrics) ; run.Run holds what is built once.
"""
