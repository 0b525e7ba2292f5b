"""Least-Loaded Expert Parallelism (arXiv 2601.17111): under routing skew, overloaded experts' excess tokens and
those experts' weights move to the least-loaded EP ranks for one step, and the weights' gradients return to their
owner, so the math is plain EP's. ``plan.py`` is the planner, a pure host function of the global per-expert counts
(every rank derives the same plan without communication); ``dispatcher.py`` is the ``LLEPDispatcher``, an
``AllToAllDispatcher`` whose phases gather the counts, plan, and move tokens, weights and gradients over the EP
group.
"""
