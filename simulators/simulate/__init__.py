"""`scgw simulate`: a whole community described in YAML, played over the wire protocols.

`spec` reads and checks the scenario file (every problem with its line), `plan` turns it
into a deterministic sequence of timed events (gate rush, lunch, faults) plus the energy
readings of the rule scenarios' generator, `runner` plays them against a broker as the
devices themselves would, `progress` shows what happens. `site` says which devices and
residents a gateway must know for the scenario (the demo seeds them; operators import them).
"""
