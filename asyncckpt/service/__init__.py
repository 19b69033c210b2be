"""The per-node writer service (``writer.mode: service``).

One process per node and job (:mod:`.server`) writes and publishes the saves of every local rank: a rank
stages its tensors into shared memory (:mod:`.shm`), hands the service a small descriptor over a Unix socket
(:mod:`.protocol`, :mod:`.client`) and returns; the service encodes, writes, fsyncs and commits with the
library's own writer and commit coordinator, and each rank's future learns the result over the socket. A
save handed over survives the training process. docs/SERVICE.md describes the design and its limits."""
