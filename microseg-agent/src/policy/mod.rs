//! The policy model, validation, evaluator and compiler (in progress).
