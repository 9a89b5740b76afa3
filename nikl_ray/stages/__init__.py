"""The stages of a run, in order: split, tune, train, features, ensemble. Each is `run(exp, data, …)`;
no stage imports another (they meet only in the artifacts under the experiment's Layout)."""
