"""A Flower deployment of the federated run: the round object of `fedjax_pt.main` with every
client a SuperNode next to its own data, running the client's side of each synchronisation
(`federated.client_round`) there.

  server_app.py  ServerApp: `fedjax_pt.train.run` over the nodes (the workdir contract of main)
  client_app.py  ClientApp: a node's part of a synchronisation (`node.py`, which runs
                 `federated.client_round`), what it keeps on its disk (`node_state.py`)
  fleet.py       the round object's clients as SuperNodes: who is who, messages, faults
  protocol.py    the messages; arrays.py pytrees <-> ArrayRecords; transport.py inline | shared
  secure.py      SecAgg+ rounds, both sides; certs.py a federation's TLS files and node keys
  local/         one command for a whole federation on this machine (TLS, node authentication)
  app/           the Flower app directory that `flwr run` submits
"""
