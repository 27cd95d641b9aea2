import typer
app = typer.Typer()
@app.command()
def generate(prompt: str):
    print(prompt)
