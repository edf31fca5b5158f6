"""placeholder"""
def logprob_kl(*a, **k):
    raise NotImplementedError
