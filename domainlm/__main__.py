"""``python -m domainlm``: the ``domainlm`` console script (:mod:`domainlm.cli`) without the installed script."""

from domainlm.cli import main

if __name__ == "__main__":
    main()
