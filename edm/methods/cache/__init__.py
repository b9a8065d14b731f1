"""Feature caching and fewer steps: training-free methods that skip computation across steps.

* ``deepcache``: DeepCache for UNets (reuse the deep up-path features between full steps);
* ``diffusers_cache``: diffusers' own cache hooks (First-Block-Cache, TaylorSeer, Pyramid
  Attention Broadcast, FasterCache, MagCache) as methods, on the families diffusers supports;
* ``steps``: fewer denoising steps, the baseline every cache is compared with.
"""
