// IDLoRA frontend extension. The job panel arrives with the background-jobs work.
import { app } from "../../scripts/app.js";

app.registerExtension({ name: "IDLoRA.core" });
