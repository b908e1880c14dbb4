"""The sans-io core: the policy, its layers, the decision and its headers, LLM units and their
prices, the upstream guard's pacing, the lease rule. It imports neither Flask nor redis (nor
werkzeug or gevent): tests/test_house.py holds that, so the rules can be read, tested and reused
without a web app or a store.
"""
