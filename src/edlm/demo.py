def add_demo_parser(sub, func):
    pass
