import click
@click.group()
def main():
    """qconv"""
