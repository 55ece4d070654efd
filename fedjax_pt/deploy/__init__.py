"""A Flower deployment of the federated run: the same round object, client update, aggregation
and outer optimizer as the simulation, with every client a SuperNode next to its own data.

  server_app.py  ServerApp: `fedjax_pt.train.run` over the nodes (the workdir contract of main)
  client_app.py  ClientApp: a node's round (`node.py`), its state kept on its disk (`node_state.py`)
  fleet.py       the round object's clients as SuperNodes: who is who, rounds, faults
  protocol.py    the messages; arrays.py pytrees <-> ArrayRecords; transport.py inline | shared
  local.py       one command for a whole federation on this machine (TLS, node authentication)
  processes.py, certs.py  what local.py starts and stops, and its certificates and keys
  app/           the Flower app directory that `flwr run` submits
"""
