"""The runtime's socket-free core: plan schema, model math, shards, predictor, delivery policy,
device compute, coordinator, the Exchange protocol with its in-process form, payload codec,
residency planner and the plan directory's files. The compiler imports only this package."""
