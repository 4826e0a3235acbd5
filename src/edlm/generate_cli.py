def add_generate_parser(sub, func):
    pass
