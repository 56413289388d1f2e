"""One APIRouter per resource; app.py includes them. Routers never import each other."""
